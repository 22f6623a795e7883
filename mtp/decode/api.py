"""Text in, text out: generation for a loaded workdir (``mtp.workdir.load_model``)."""

from __future__ import annotations

import sys

import numpy as np

from mtp.config import DEFAULT_DECODE_SETTINGS, DecodeSettings
from mtp.decode.calibrate import calibrated_tree, parse_auto
from mtp.decode.draft_vocab import draft_ids
from mtp.decode.generate import PAD_TO, DecodeConfig, GenerateResult, generate
from mtp.decode.tree import parse_tree


def decode_config(loaded, *, mode: str = "greedy", heads: int | None = None, tree=None,
                  max_new_tokens: int = 128, temperature: float = 0.8, top_p: float = 1.0,
                  top_k: int = 0, stop_at_eos: bool = True, draft_vocab: int | None = None,
                  settings: DecodeSettings = DEFAULT_DECODE_SETTINGS) -> DecodeConfig:
    """A DecodeConfig for this model: speculative modes default to all heads, plain ones to 1.
    ``draft_vocab``: heads 2..k draft among that many most frequent tokens (0: all; None: the
    default of ``mtp.decode.draft_vocab.resolve_size``); the output does not depend on it.
    ``settings``: how the decode computes here (``DecodeSettings``; ``--decode-*`` flags)."""
    speculative = mode.startswith("speculative")
    if heads is None:
        heads = loaded.spec.n_future if speculative else 1
    if not speculative:
        heads = 1
    n_auto = parse_auto(tree) if speculative else None
    if n_auto is not None:  # a sparse tree calibrated on this model (cached in the workdir)
        if loaded.workdir is None:
            raise ValueError("--tree auto needs a model loaded from a workdir (it keeps the tree there).")
        tree = calibrated_tree(loaded, loaded.workdir, heads, n_auto)
    elif isinstance(tree, str):
        parsed = parse_tree(tree, heads)
        tree = parsed.nodes if ";" in tree or "." in tree else parsed.widths
    eos = loaded.tokenizer.eos_id if stop_at_eos else -1
    ids = draft_ids(loaded, draft_vocab) if speculative and heads > 1 else None
    return DecodeConfig(mode=mode, heads=heads, tree=tuple(tree) if tree else None,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, eos_id=eos, draft_ids=ids, settings=settings)


def encode_prompt(loaded, text: str) -> list[int]:
    ids = loaded.tokenizer.encode(text)
    if not ids:
        bos = getattr(loaded.tokenizer, "bos_id", None)
        if bos is None or bos < 0:
            raise ValueError("The prompt is empty; give some text to continue.")
        ids = [bos]
    return ids


def generate_ids(loaded, prompts: list[list[int]], dc: DecodeConfig, *, seed: int = 0,
                 batch_size: int = 8, progress: bool = False) -> list[GenerateResult]:
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        results.append(generate(loaded.model, chunk, dc, seed=seed + start, pad_to=PAD_TO))
        if progress:
            print(f"\r  generated {start + len(chunk)}/{len(prompts)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return results


def _strip_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def generate_texts(loaded, prompts: list[str], *, mode: str = "greedy", heads: int | None = None,
                   max_new_tokens: int = 128, temperature: float = 0.8, top_p: float = 1.0,
                   top_k: int = 0, seed: int = 0, tree=None, batch_size: int = 8,
                   settings: DecodeSettings = DEFAULT_DECODE_SETTINGS) -> list[str]:
    """Completions (text after each prompt, EOS removed) for a list of prompts."""
    dc = decode_config(loaded, mode=mode, heads=heads, tree=tree, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, top_k=top_k, settings=settings)
    ids = [encode_prompt(loaded, p) for p in prompts]
    out = []
    for r in generate_ids(loaded, ids, dc, seed=seed, batch_size=batch_size):
        out.extend(loaded.tokenizer.decode(_strip_eos(t, dc.eos_id)) for t in r.tokens)
    return out


def tokens_per_forward(loaded, prompts: list[str], heads: int, max_new_tokens: int = 64,
                       tree=None) -> float:
    """Self-speculative greedy tokens per model forward (prefill included), batch 1 per prompt."""
    if heads <= 1 or loaded.spec.n_future < 2:
        return 1.0
    dc = decode_config(loaded, mode="speculative", heads=min(heads, loaded.spec.max_decode_heads), tree=tree,
                       max_new_tokens=max_new_tokens, stop_at_eos=False)
    tokens = forwards = 0
    for p in prompts:
        r = generate(loaded.model, [encode_prompt(loaded, p)], dc, pad_to=PAD_TO)
        tokens += len(r.tokens[0])
        forwards += r.forwards
    return tokens / max(forwards, 1)


class TextStreamer:
    """Prints the text of a growing token list as it grows (decoding the whole list each time, so
    multi-byte characters and merged pieces come out right)."""

    def __init__(self, tokenizer, eos_id: int, file=None):
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.file = file or sys.stdout  # the stdout of now, not of import time
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, new_ids) -> None:
        for t in np.asarray(new_ids).tolist():
            if t == self.eos_id:
                return
            self.ids.append(int(t))
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            self.file.write(text[len(self.printed):])
            self.file.flush()
            self.printed = text
