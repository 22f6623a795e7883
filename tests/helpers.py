"""Small shared builders for tests: a tiny model spec and config that compile in seconds, and tiny
random Llama checkpoints written as GGUF and Hugging Face files (for the convert and parity tests)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf  # an install requirement of mtp: a missing package must fail, not skip
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from mtp.config import base_config
from mtp.model import MTPLM
from mtp.model.spec import ModelSpec


def tiny_spec(**overrides) -> ModelSpec:
    kw = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_future=3,
              max_seq_len=64)
    kw.update(overrides)
    return ModelSpec(**kw)


def tiny_model(seed: int = 0, **overrides) -> MTPLM:
    return MTPLM(tiny_spec(**overrides), rngs=nnx.Rngs(seed))


def tiny_config(**model_overrides):
    c = base_config()
    c.model.update(dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        n_future=3, max_seq_len=64))
    c.model.update(model_overrides)
    c.data.vocab_size = c.model.vocab_size
    c.train.batch_size, c.train.seq_len = 8, 16
    c.loss.chunk_size = 4
    return c


def random_tokens(key: int, shape, vocab: int = 97):
    return jax.random.randint(jax.random.key(key), shape, 0, vocab)


def with_params(model, pure: dict):
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def argmax_zero_model(model):
    """The model with its final norm scale zeroed: every logit of every head is 0, so every argmax
    (head 1's and every draft) is token 0 and every draft is right."""
    pure = nnx.to_pure_dict(nnx.state(model))
    pure["final_norm"]["scale"] = jnp.zeros_like(pure["final_norm"]["scale"])
    return with_params(model, pure)


def heads_like_head1(model, noise=0.0, seed=0):
    """Copy head 1's layer into every head (+ optional noise): drafts then track head 1."""
    pure = nnx.to_pure_dict(nnx.state(model))
    key = jax.random.key(seed)
    for i, (path, x) in enumerate(jax.tree_util.tree_leaves_with_path(pure["heads"])):
        noisy = jnp.broadcast_to(x[:1], x.shape)
        if noise:
            noisy = noisy + noise * jnp.std(x) * jax.random.normal(jax.random.fold_in(key, i), x.shape)
        pure["heads"] = jax.tree_util.tree_map_with_path(
            lambda p, y, path=path, noisy=noisy: noisy if p == path else y, pure["heads"])
    return with_params(model, pure)


def constant_input_model(model, same_heads: bool):
    """Every token embeds to the same vector, so every position's hidden state is the same and the
    greedy output repeats one token: with heads = copies of head 1 every draft is right, with
    independent heads every draft is wrong."""
    m = heads_like_head1(model) if same_heads else model
    pure = nnx.to_pure_dict(nnx.state(m))
    pure["embed"] = jnp.broadcast_to(pure["embed"][7:8], pure["embed"].shape)
    return with_params(m, pure)

# --- tiny Llama files (GGUF and Hugging Face) for the convert and parity tests -----------------------
# shapes of the tiny Llama: vocab, width, MLP width, query heads, KV heads, head dim, layers
VOCAB, D, F, N, K, H, LAYERS = 300, 64, 256, 4, 2, 16, 3
THETA, EPS = 5000.0, 1e-6
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 3
        + "The quick brown fox jumps over the lazy dog. Hello world! 0123456789 " * 3)


def tiny_bpe():
    """A byte-level BPE with exactly VOCAB tokens (3 specials first), trained on TEXT."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def bpe_parts(tok):
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def random_weights(seed: int, tie: bool, n_layers: int = LAYERS) -> dict[str, np.ndarray]:
    """HF-named float32 weights of a tiny Llama (norm scales random too, so they are tested)."""
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (VOCAB, D)),
         "model.norm.weight": rng.uniform(0.5, 1.5, D)}
    if not tie:
        w["lm_head.weight"] = rng.normal(0, 0.2, (VOCAB, D))
    for i in range(n_layers):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": rng.uniform(0.5, 1.5, D),
              p + "post_attention_layernorm.weight": rng.uniform(0.5, 1.5, D),
              p + "self_attn.q_proj.weight": rng.normal(0, 0.25, (N * H, D)),
              p + "self_attn.k_proj.weight": rng.normal(0, 0.25, (K * H, D)),
              p + "self_attn.v_proj.weight": rng.normal(0, 0.2, (K * H, D)),
              p + "self_attn.o_proj.weight": rng.normal(0, 0.15, (D, N * H)),
              p + "mlp.gate_proj.weight": rng.normal(0, 0.15, (F, D)),
              p + "mlp.up_proj.weight": rng.normal(0, 0.15, (F, D)),
              p + "mlp.down_proj.weight": rng.normal(0, 0.08, (D, F))}
    return {k: v.astype(np.float32) for k, v in w.items()}


def hf_config(tie: bool, n_layers: int = LAYERS) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
            "hidden_size": D, "intermediate_size": F, "num_hidden_layers": n_layers,
            "num_attention_heads": N, "num_key_value_heads": K, "head_dim": H, "hidden_act": "silu",
            "max_position_embeddings": 128, "rms_norm_eps": EPS, "rope_theta": THETA,
            "rope_parameters": {"rope_type": "default", "rope_theta": THETA},
            "tie_word_embeddings": tie, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32"}


def write_hf_dir(d: Path, weights: dict, tie: bool, tok=None) -> Path:
    """A Hugging Face directory written without torch: config.json, safetensors, tokenizer."""
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_config(tie, _n_layers(weights))))
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(d / "model.safetensors"))
    (tok or tiny_bpe()).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE,
                                                         "eos_token": "<|im_end|>"}))
    return d


def _n_layers(weights) -> int:
    return len({k.split(".")[2] for k in weights if k.startswith("model.layers.")})


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's ``permute`` (HF q/k rows -> GGUF), written out here so
    the importer's inverse is checked against an independent copy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_OF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    if hf in GGUF_OF:
        return GGUF_OF[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{GGUF_OF[rest.removesuffix('.weight')]}.weight"


def raw_kquant(qtype, shape, seed: int) -> np.ndarray:
    """Random but finite K-quant blocks (gguf cannot quantize K-quants): random bytes with small f16
    super-block scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    if qtype == Q.Q6_K:  # ql[128] qh[64] scales[16] d(f16)
        raw[..., -2:] = np.frombuffer(np.float16(2e-5).tobytes(), np.uint8)
    elif qtype == Q.Q4_K:  # d(f16) dmin(f16) scales[12] qs[128]
        raw[..., 0:2] = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
        raw[..., 2:4] = np.frombuffer(np.float16(5e-5).tobytes(), np.uint8)
    else:
        raise NotImplementedError(qtype)
    return raw.reshape(rows, cols // block * size)


def encode_tensor(name: str, w: np.ndarray, qtype, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(data to write, its float32 dequantized value) for a GGUF-ordered tensor."""
    if qtype == Q.F32:
        return w, w
    if qtype in (Q.Q6_K, Q.Q4_K):
        raw = raw_kquant(qtype, w.shape, seed)
    else:
        raw = quantize(w, qtype)
    return raw, dequantize(raw, qtype).astype(np.float32).reshape(w.shape)


def write_gguf(path: Path, weights: dict, *, types: dict | None = None, skip: str | None = None,
               override: dict | None = None, tok=None, tie: bool | None = None) -> dict[str, np.ndarray]:
    """Write weights (HF names/orientation) as a llama.cpp-style GGUF: q/k rows permuted, tensors
    in ``types`` (default F32). Returns the HF-named reference weights as the file holds them
    (dequantized, un-permuted)."""
    types, override = types or {}, override or {}
    tie = "lm_head.weight" not in weights if tie is None else tie
    n_layers = _n_layers(weights)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layers)
    writer.add_context_length(128)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(F)
    writer.add_head_count(N)
    writer.add_head_count_kv(K)
    writer.add_rope_freq_base(THETA)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_rope_dimension_count(H)
    writer.add_vocab_size(VOCAB)
    tokens, merges = bpe_parts(tok or tiny_bpe())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    reference = {}
    for seed, (hf, w) in enumerate(weights.items()):
        name = gguf_name(hf)
        if name == skip:
            continue
        g = w
        if "attn_q" in name:
            g = llama_cpp_permute(w, N)
        elif "attn_k" in name:
            g = llama_cpp_permute(w, K)
        g = override.get(name, g)
        data, value = encode_tensor(name, np.ascontiguousarray(g), types.get(name, Q.F32), seed)
        qtype = types.get(name, Q.F32)
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, data.astype(np.float16) if qtype == Q.F16 else data)
        else:
            writer.add_tensor(name, data, raw_dtype=qtype)
        if "attn_q" in name:  # back to HF order, the independent way: invert by search
            value = _unpermute_reference(value, N)
        elif "attn_k" in name:
            value = _unpermute_reference(value, K)
        reference[hf] = value
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def _unpermute_reference(v: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama_cpp_permute by applying its row permutation's inverse (argsort of the indices)."""
    idx = llama_cpp_permute(np.arange(v.shape[0])[:, None], n_head)[:, 0]
    return v[np.argsort(idx)]


def one_device_env(**extra) -> dict:
    """The environment for an ``mtp`` subprocess on one CPU device, as a user runs it: the test
    session's XLA flags less the simulated device count (conftest's compile flags stay)."""
    env = {k: v for k, v in os.environ.items()}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(extra)
    return env
