"""``mtp bench peers``: our plain and self-speculative greedy decoding next to Hugging Face
transformers ``generate`` (fp32; on the GPU when JAX runs on one and torch sees CUDA, else CPU) and
llama.cpp (``llama-cpp-python``, the GGUF as shipped), in one run, batch 1, greedy, the same prompts
and the same number of new tokens (EOS ignored by every engine, so all produce exactly
``--max-new-tokens``).

Peers are optional extras: a missing package is reported as ``{"skipped": reason}`` in its row,
never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from mtp.bench.decode_bench import block_products, decode_weights_used, measure_read_bandwidth, tree_text
from mtp.config import DEFAULT_DECODE_SETTINGS, DecodeSettings
from mtp.data.prompts import heldout_prompts, read_prompts
from mtp.decode.api import PAD_TO, decode_config
from mtp.decode.generate import generate
from mtp.decode.settings import settings_from_args
from mtp.train.init_from import resolve_gguf
from mtp.workdir import load_model


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _best_time(loaded, ids, dc, repeats: int):
    r = generate(loaded.model, [ids], dc, pad_to=PAD_TO)  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        r = generate(loaded.model, [ids], dc, pad_to=PAD_TO)
        best = min(best, time.perf_counter() - t)
    return best, r


def _run_ours(loaded, prompt_ids, dc, repeats: int, decode_rate: bool = False) -> tuple[dict, list]:
    """tokens/s of whole generations (prefill included, as the peers are timed) and tokens/forward;
    ``decode_rate``: also the decode loop's own rate, ``(n - 1) / (t(n tokens) - t(1 token))``, the
    prefill and first token timed as a 1-token generation of the same prompt (its cache is
    ``max_new_tokens - 1`` slots shorter: a slightly cheaper prefill, so a rate a little low)."""
    total_t, total_n, forwards, outs, pre_t = 0.0, 0, 0, [], 0.0
    for ids in prompt_ids:
        best, r = _best_time(loaded, ids, dc, repeats)
        if decode_rate:
            pre_t += _best_time(loaded, ids, dataclasses.replace(dc, max_new_tokens=1), repeats)[0]
        total_t += best
        total_n += len(r.tokens[0])
        forwards += r.forwards
        outs.append(r.tokens[0])
    row = {"tokens_per_s": total_n / total_t, "tokens_per_forward": total_n / forwards}
    if decode_rate:
        row["decode_tokens_per_s"] = (total_n - len(prompt_ids)) / max(total_t - pre_t, 1e-9)
    return row, outs


def packed_variants(settings: DecodeSettings) -> tuple[tuple[str, DecodeSettings], ...]:
    """The greedy rows measured beside packed (GGUF-block) weights: the same model from float32
    weights (exact: the same output), and with llama.cpp's int8 activations (lossy)."""
    return (("mtp greedy (float32 weights)", dataclasses.replace(settings, packed_weights=False)),
            ("mtp greedy (GGUF blocks, int8 activations)", dataclasses.replace(settings, packed_activations="int8")))


def bench_ours(loaded, prompt_ids, max_new: int, heads: int, tree, repeats: int, log,
               draft_vocab: int | None = None,
               settings: DecodeSettings = DEFAULT_DECODE_SETTINGS) -> tuple[dict, list, dict]:
    """Our greedy and speculative rows with the decode weights ``settings`` give (GGUF blocks when
    the model is exactly packable, ``mtp.decode.packed``), and then the ``packed_variants`` as well
    when they were packed. Returns the rows, our greedy output and the step bytes of each greedy row."""
    rows, step_bytes = {}, {}
    used = decode_weights_used(loaded, settings)
    packed = bool(used["packing"].get("exact"))
    greedy_label = "mtp greedy (GGUF blocks)" if packed else "mtp greedy"
    dc = decode_config(loaded, mode="greedy", max_new_tokens=max_new, stop_at_eos=False, settings=settings)
    rows[greedy_label], greedy = _run_ours(loaded, prompt_ids, dc, repeats, decode_rate=True)
    step_bytes[greedy_label] = used["step_bytes"]
    log(f"  {greedy_label}: {rows[greedy_label]['tokens_per_s']:.2f} tokens/s")
    if loaded.spec.n_future >= 2:
        dc = decode_config(loaded, mode="speculative", heads=heads, tree=tree, max_new_tokens=max_new,
                           stop_at_eos=False, draft_vocab=draft_vocab, settings=settings)
        shape = tree_text(dc.tree)
        extra = (f", tree {shape}" if shape else "") + (", GGUF blocks" if packed else "")
        extra += f", draft vocab {len(dc.draft_ids)}" if dc.draft_ids else ""
        label = f"mtp speculative (heads={heads}{extra})"
        rows[label], spec = _run_ours(loaded, prompt_ids, dc, repeats)
        rows[label]["identical_to_mtp_greedy"] = spec == greedy
        log(f"  {label}: {rows[label]['tokens_per_s']:.2f} tokens/s")
    if packed:  # the same greedy from float32 weights, and with llama.cpp's int8 activations (lossy)
        for label, variant in packed_variants(settings):
            step_bytes[label] = decode_weights_used(loaded, variant)["step_bytes"]
            dc = decode_config(loaded, mode="greedy", max_new_tokens=max_new, stop_at_eos=False, settings=variant)
            rows[label], out = _run_ours(loaded, prompt_ids, dc, repeats, decode_rate=True)
            if not variant.packed_weights:
                rows[label]["identical_to_mtp_greedy"] = out == greedy
            else:  # not the float model's output any more: how far it follows it
                rows[label]["agreement_with_mtp_greedy"] = _agreement(greedy, out)
            log(f"  {label}: {rows[label]['tokens_per_s']:.2f} tokens/s")
    return rows, greedy, {**step_bytes, "packing": used["packing"]}


def bench_transformers(gguf: Path, prompt_ids, max_new: int, log) -> tuple[dict, list | None]:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return {"skipped": f"transformers/torch not installed ({e.name}); pip install -e '.[dev]'"}, None
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(_threads())
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval().to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    total_t, total_n, outs = 0.0, 0, []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids], device=device)
            kw = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, num_beams=1,
                      pad_token_id=model.config.eos_token_id)
            model.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           pad_token_id=model.config.eos_token_id)  # warm up
            sync()
            t = time.perf_counter()
            out = model.generate(x, **kw)
            sync()
            total_t += time.perf_counter() - t
            new = out[0, len(ids):].tolist()
            total_n += len(new)
            outs.append(new)
    log(f"  transformers: {total_n / total_t:.2f} tokens/s")
    return {"tokens_per_s": total_n / total_t, "dtype": "float32", "device": device,
            "threads": torch.get_num_threads()}, outs


def bench_llama_cpp(gguf: Path, prompt_ids, max_new: int, log) -> tuple[dict, list | None]:
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python not installed; pip install -e '.[peers]' (compiles llama.cpp)"}, None
    n_ctx = max(len(p) for p in prompt_ids) + max_new + 8
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=_threads(), n_batch=512, verbose=False,
                          logits_all=False)
    total_t, total_n, outs = 0.0, 0, []
    for ids in prompt_ids:
        for warm in (True, False):
            llm.reset()
            new = []
            t = time.perf_counter()
            for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                new.append(int(tok))
                if len(new) == (4 if warm else max_new):
                    break
            dt = time.perf_counter() - t
        total_t += dt
        total_n += len(new)
        outs.append(new)
    log(f"  llama.cpp: {total_n / total_t:.2f} tokens/s")
    return {"tokens_per_s": total_n / total_t, "weights": "GGUF as shipped", "threads": _threads(),
            "version": getattr(llama_cpp, "__version__", "?")}, outs


def _agreement(ours: list[list[int]], theirs: list[list[int]] | None) -> float | None:
    """Mean length of the common prefix with our greedy output, as a fraction of the tokens."""
    if theirs is None:
        return None
    fracs = []
    for a, b in zip(ours, theirs):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        fracs.append(n / max(len(a), 1))
    return float(np.mean(fracs))


def _faster(old: dict | None, new: dict, rounds: int) -> dict:
    """The row of the faster round (tokens/s of every round kept in ``tokens_per_s_rounds``)."""
    if "tokens_per_s" not in new:
        return new
    seen = (old or {}).get("tokens_per_s_rounds", []) + [new["tokens_per_s"]]
    best = dict(new if old is None or new["tokens_per_s"] > old["tokens_per_s"] else old)
    for key in ("identical_to_mtp_greedy",):  # must hold in every round
        if old is not None and key in old and key in new:
            best[key] = bool(old[key]) and bool(new[key])
    return {**best, "tokens_per_s_rounds": seen} if rounds > 1 else best


def run_peers(args) -> dict:
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    gguf = Path(resolve_gguf(args.gguf))
    if not gguf.is_file():
        raise ValueError(f"--gguf {gguf}: no such file.")
    loaded = load_model(args.workdir)
    prompts = read_prompts(args.prompts) if args.prompts else heldout_prompts(loaded.cfg.data, n=args.n_prompts)
    prompt_ids = [loaded.tokenizer.encode(p) for p in prompts]
    heads = args.heads or loaded.spec.n_future
    tree = args.tree or None  # widths, sparse nodes or auto[:N] (decode_config reads them)
    rounds = max(1, int(getattr(args, "rounds", 1) or 1))
    settings = settings_from_args(args)
    log(f"Peers: {len(prompts)} prompts, batch 1, greedy, {args.max_new_tokens} new tokens, {_threads()} threads,"
        f" {rounds} round(s) of ours and llama.cpp")
    rows = {}
    lc_label = "llama.cpp (llama-cpp-python)"
    for r in range(rounds):  # interleaved, best round per engine: a shared VM's speed drifts by minutes
        if rounds > 1:
            log(f" round {r + 1}/{rounds}")
        ours, ours_greedy, step_bytes = bench_ours(loaded, prompt_ids, args.max_new_tokens, heads, tree,
                                                   args.repeats, log, draft_vocab=getattr(args, "draft_vocab", None),
                                                   settings=settings)
        lc, lc_out = bench_llama_cpp(gguf, prompt_ids, args.max_new_tokens, log)
        if lc_out is not None:
            lc["agreement_with_mtp_greedy"] = _agreement(ours_greedy, lc_out)
        for label, row in {**ours, lc_label: lc}.items():
            rows[label] = _faster(rows.get(label), row, rounds)
    packing = step_bytes.pop("packing")
    hf, hf_out = bench_transformers(gguf, prompt_ids, args.max_new_tokens, log)
    if hf_out is not None:
        hf["agreement_with_mtp_greedy"] = _agreement(ours_greedy, hf_out)
    rows = {**{k: v for k, v in rows.items() if k != lc_label}, "transformers generate (fp32)": hf,
            lc_label: rows[lc_label]}
    bw = measure_read_bandwidth(settings=settings)
    greedy_label = next(iter(step_bytes))  # the default decode weights' greedy row
    roofline = {label: bw / n for label, n in step_bytes.items()}
    for label, r in roofline.items():
        rows[label]["roofline_tokens_per_s"] = r
        rows[label]["fraction_of_roofline"] = rows[label]["tokens_per_s"] / r
        if "decode_tokens_per_s" in rows[label]:  # the decode steps alone: what the roofline bounds
            rows[label]["decode_fraction_of_roofline"] = rows[label]["decode_tokens_per_s"] / r
        rows[label]["step_bytes"] = step_bytes[label]
    result = {"rows": rows, "roofline_tokens_per_s": roofline[greedy_label],
              "greedy_fraction_of_roofline": rows[greedy_label]["fraction_of_roofline"],
              "greedy_decode_fraction_of_roofline": rows[greedy_label].get("decode_fraction_of_roofline"),
              "read_bandwidth_gb_s": bw / 1e9, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "workdir": str(args.workdir), "gguf": str(gguf), "block_products": block_products(settings),
              "decode_weights": packing}
    spec_label = next((k for k in rows if k.startswith("mtp speculative")), None)
    if spec_label:
        spec = rows[spec_label]["tokens_per_s"]
        for peer in ("transformers generate (fp32)", "llama.cpp (llama-cpp-python)"):
            if "tokens_per_s" in rows[peer]:
                result[f"speculative_vs_{peer.split()[0]}"] = spec / rows[peer]["tokens_per_s"]
        for peer in ("llama.cpp (llama-cpp-python)",):
            if "tokens_per_s" in rows[peer]:
                result[f"greedy_vs_{peer.split()[0]}"] = rows[greedy_label]["tokens_per_s"] / rows[peer]["tokens_per_s"]
    return result


def format_table(result: dict) -> str:
    lines = ["| engine | tokens/s | tokens/forward | notes |", "|---|---|---|---|"]
    for name, row in result["rows"].items():
        if "skipped" in row:
            lines.append(f"| {name} | — | — | skipped: {row['skipped']} |")
            continue
        notes = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                          if k not in ("tokens_per_s", "tokens_per_forward", "roofline_tokens_per_s", "step_bytes",
                                       "tokens_per_s_rounds"))
        tpf = f"{row['tokens_per_forward']:.2f}" if "tokens_per_forward" in row else "—"
        lines.append(f"| {name} | {row['tokens_per_s']:.2f} | {tpf} | {notes} |")
    lines.append(f"\nroofline = read bandwidth {result['read_bandwidth_gb_s']:.1f} GB/s / decode-weight bytes"
                 " of a plain greedy step:")
    for name, row in result["rows"].items():
        if "roofline_tokens_per_s" in row:
            mb, roof, frac = row["step_bytes"] / 1e6, row["roofline_tokens_per_s"], 100 * row["fraction_of_roofline"]
            line = f"- {name}: {mb:.1f} MB per step, roofline {roof:.2f} tokens/s, at {frac:.0f}% of it"
            if "decode_fraction_of_roofline" in row:
                line += (f" with the prefill, decode steps alone {row['decode_tokens_per_s']:.2f} tokens/s"
                         f" ({100 * row['decode_fraction_of_roofline']:.0f}%)")
            lines.append(line)
    return "\n".join(lines)


def main(args) -> int:
    result = run_peers(args)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
