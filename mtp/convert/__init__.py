"""Import pretrained Llama-family weights into an mtp workdir.

    mtp convert --gguf FILE --workdir DIR      llama.cpp GGUF (any tensor type gguf can dequantize)
    mtp convert --hf DIR --workdir DIR         Hugging Face safetensors + config.json (+ tokenizer.json)

A Llama with L layers becomes an ``MTPLM`` with ``n_future=1``: HF layers 0..L-2 are the trunk and
layer L-1 is the model's own next-token head (``heads[0]``), so logits equal the source model's.
See docs/pretrained.md.
"""

from __future__ import annotations


class ConvertError(ValueError):
    """A source file that cannot be imported; the message names the tensor (or key) and what was
    expected. Raised before anything is written to the target workdir."""


def convert_gguf(path, workdir, **kwargs):
    from mtp.convert.gguf_import import convert_gguf as _convert

    return _convert(path, workdir, **kwargs)


def convert_hf(path, workdir, **kwargs):
    from mtp.convert.hf_import import convert_hf as _convert

    return _convert(path, workdir, **kwargs)


__all__ = ["ConvertError", "convert_gguf", "convert_hf"]
