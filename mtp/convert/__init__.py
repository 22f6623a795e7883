"""Import pretrained Llama-family weights into an mtp workdir.

    mtp convert --gguf FILE --workdir DIR      llama.cpp GGUF (any tensor type gguf can dequantize)
    mtp convert --hf DIR --workdir DIR         Hugging Face safetensors + config.json (+ tokenizer.json)

A Llama with L layers becomes an ``MTPLM`` with ``n_future=1``: HF layers 0..L-2 are the trunk and
layer L-1 is the model's own next-token head (``heads[0]``), so logits equal the source model's.
See docs/pretrained.md.
"""

from mtp.convert.gguf_import import convert_gguf
from mtp.convert.hf_import import convert_hf
from mtp.convert.llama_map import ConvertError

__all__ = ["ConvertError", "convert_gguf", "convert_hf"]
