"""``mtp bench decode``: plain greedy vs self-speculative greedy, batch 1, on a workdir's model.

For every prompt (one ``{"prompt": ...}`` per JSONL line) both decoders run once to compile and
once timed; the result compares their outputs token for token (``exact_match``), counts tokens
per forward and per-head acceptance, and puts plain greedy next to the memory-bandwidth roofline:
the bytes of the parameters one plain decode step reads (trunk, head 1, norm, unembedding)
divided into the measured read bandwidth of this machine.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtp.config import DEFAULT_DECODE_SETTINGS, DecodeSettings
from mtp.data.prompts import heldout_prompts, read_prompts
from mtp.decode import weights as dw
from mtp.decode.api import PAD_TO, decode_config, encode_prompt
from mtp.decode.backend import make_backend
from mtp.decode.generate import generate
from mtp.decode.settings import settings_from_args
from mtp.decode.tree import format_nodes, is_node_list
from mtp.kernels import kernel_status, rows_matmul, rows_matmul_available
from mtp.plan import parse_mesh
from mtp.sharding import device_mesh
from mtp.workdir import load_model


def measure_read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5,
                           settings: DecodeSettings = DEFAULT_DECODE_SETTINGS) -> float:
    """Bytes/s of a full read of an array far larger than the caches (best of N): the faster of a
    jitted sum (XLA may read it on one thread) and, where the CPU kernels are built, a one-row
    product with a float32 matrix on all kernel threads (what decoding's products do). The faster
    read sets the roofline, so a roofline fraction is never flattered by a one-thread probe."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    probes = [jax.jit(jnp.sum)]
    if rows_matmul_available(settings):
        x = x.reshape(-1, 1024)
        row = jnp.ones((1, 1024), jnp.float32)
        probes = [jax.jit(jnp.sum), jax.jit(lambda a: rows_matmul(row, a, True))]
    best = float("inf")
    for f in probes:
        f(x).block_until_ready()
        for _ in range(repeats):
            t = time.perf_counter()
            f(x).block_until_ready()
            best = min(best, time.perf_counter() - t)
    del x
    return n_bytes / best


def decode_weights_used(loaded, settings: DecodeSettings = DEFAULT_DECODE_SETTINGS) -> dict:
    """What our decoding reads with ``settings``: the packing report (``mtp.decode.packed``; 'exact'
    = 0 when the weights stay float32) and the decode-weight bytes of a plain greedy step."""
    weights = dw.cached_decode_weights(loaded.model, settings)
    return {"packing": dict(dw.LAST_PACKING), "step_bytes": dw.step_bytes(weights)}


def _timed(model, ids, dc, repeats: int, mesh=None, rules=None):
    """Result and best wall time of ``repeats`` runs after a compile/warm-up run."""
    r = generate(model, [ids], dc, pad_to=PAD_TO, mesh=mesh, rules=rules)  # compile (once per prompt-length bucket)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        r = generate(model, [ids], dc, pad_to=PAD_TO, mesh=mesh, rules=rules)
        best = min(best, time.perf_counter() - t)
    return r, best


def tree_text(tree) -> str | None:
    """A DecodeConfig's tree as the ``--tree`` text that gives it back (None for a chain)."""
    if not tree:
        return None
    return format_nodes(tree) if is_node_list(tree) else ",".join(map(str, tree))


def run_decode_bench(loaded, prompts: list[str], *, heads: int | None, max_new_tokens: int,
                     tree: str | None = None, bandwidth: float | None = None, repeats: int = 1,
                     draft_vocab: int | None = None, log=print, outputs: list | None = None,
                     settings: DecodeSettings = DEFAULT_DECODE_SETTINGS, mesh=None) -> dict:
    """Plain greedy against self-speculative decoding, batch 1, on every prompt (``mesh``: decode on
    this device mesh, ``mtp.sharding.device_mesh``)."""
    heads = heads or loaded.spec.n_future
    if heads < 2:
        raise ValueError(f"{loaded.spec.n_future} head(s): speculative decoding needs heads 2..k to draft."
                         " Train heads first (e.g. configs/smollm2_heads.py), or pass --heads 2+.")
    greedy_dc = decode_config(loaded, mode="greedy", max_new_tokens=max_new_tokens, stop_at_eos=False,
                              settings=settings)
    spec_dc = decode_config(loaded, mode="speculative", heads=heads, tree=tree, max_new_tokens=max_new_tokens,
                            stop_at_eos=False, draft_vocab=draft_vocab, settings=settings)
    t_greedy = t_spec = 0.0
    n_tokens = forwards = steps = 0
    accepted = np.zeros(spec_dc.heads, np.int64)
    exact = True
    for i, text in enumerate(prompts):
        ids = encode_prompt(loaded, text)
        rules = loaded.cfg.sharding.rules  # the run's own logical-axis rules
        g, dt_g = _timed(loaded.model, ids, greedy_dc, repeats, mesh, rules)
        s, dt_s = _timed(loaded.model, ids, spec_dc, repeats, mesh, rules)
        same = g.tokens[0] == s.tokens[0]
        exact &= same
        if outputs is not None:  # the continuations as text, one record a prompt (--outputs)
            outputs.append({"prompt": text, "greedy": loaded.tokenizer.decode(list(g.tokens[0])),
                            "speculative": loaded.tokenizer.decode(list(s.tokens[0])), "identical": bool(same)})
        t_greedy += dt_g
        t_spec += dt_s
        n_tokens += len(g.tokens[0])
        forwards += s.forwards
        steps += int(s.steps.sum())
        accepted += s.accepted.sum(0)
        log(f"  prompt {i + 1}/{len(prompts)}: {len(ids)} tokens; greedy {len(g.tokens[0]) / dt_g:7.1f} tok/s,"
            f" speculative {len(s.tokens[0]) / dt_s:7.1f} tok/s, {len(s.tokens[0]) / s.forwards:.2f}"
            f" tokens/forward{'' if same else '  OUTPUT DIFFERS'}")
    bandwidth = bandwidth or measure_read_bandwidth(settings=settings)
    used = decode_weights_used(loaded, settings)
    step_bytes = used["step_bytes"]
    roofline = bandwidth / step_bytes
    tps_greedy = n_tokens / t_greedy
    return {
        "tokens_per_forward": n_tokens / forwards,
        "accept_rate_per_head": [float(accepted[d] / max(steps, 1)) for d in range(1, spec_dc.heads)],
        "tokens_per_s_greedy": tps_greedy,
        "tokens_per_s_speculative": n_tokens / t_spec,
        "speedup": t_greedy / t_spec,
        "exact_match": bool(exact),
        "roofline_tokens_per_s": roofline,
        "greedy_fraction_of_roofline": tps_greedy / roofline,
        "heads": spec_dc.heads,
        "tree": tree_text(spec_dc.tree),
        "draft_vocab": len(spec_dc.draft_ids) if spec_dc.draft_ids else loaded.spec.vocab_size,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "new_tokens": n_tokens,
        "param_bytes_per_step": step_bytes,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "device": jax.devices()[0].device_kind,
        "block_products": block_products(settings),
        "decode_weights": used["packing"],
        "decode_settings": dataclasses.asdict(settings),
        "decode_backend": make_backend(settings, n_devices=1 if mesh is None else mesh.size, spec=loaded.spec).name,
        "mesh": None if mesh is None else dict(mesh.shape),
    }


def block_products(settings: DecodeSettings = DEFAULT_DECODE_SETTINGS) -> str:
    """Which code multiplies decode blocks by the weight matrices with ``settings`` (mtp/kernels)."""
    if settings.backend == "xla":
        return "XLA (decode backend xla)"
    status = kernel_status()
    return "mtp rows_matmul kernel" if status["available"] else f"XLA ({status['reason']})"


def main(args) -> int:
    log = (lambda *a, **k: print(*a, **k, file=sys.stderr)) if args.json else print
    mesh = device_mesh(parse_mesh(args.mesh)) if getattr(args, "mesh", None) else None
    loaded = load_model(args.workdir)
    if args.prompts:
        prompts = read_prompts(args.prompts)
    else:
        prompts = heldout_prompts(loaded.cfg.data, n=args.n_prompts)
        log(f"No --prompts: using {len(prompts)} held-out snippets (validation split of {loaded.cfg.data.source}).")
    log(f"Decode benchmark: {args.workdir} (step {loaded.step}), {len(prompts)} prompts, batch 1,"
        f" {args.max_new_tokens} new tokens, heads={args.heads or loaded.spec.n_future}"
        f"{', tree ' + args.tree if args.tree else ''}")
    outputs = [] if args.outputs else None
    result = run_decode_bench(loaded, prompts, heads=args.heads, max_new_tokens=args.max_new_tokens,
                              tree=args.tree, repeats=args.repeats, draft_vocab=args.draft_vocab, log=log,
                              outputs=outputs, settings=settings_from_args(args), mesh=mesh)
    if outputs is not None:
        with open(args.outputs, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in outputs)
        log(f"Continuations of {len(outputs)} prompts (prompt, greedy, speculative) -> {args.outputs}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:28s} {v}")
    return 0
