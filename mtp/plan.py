"""``mtp plan``: per-device memory and FLOPs of a config's train step on a mesh, without the devices.

Two sources, reported side by side:

* **analytic** -- parameter and optimizer-state bytes are exact: ``make_layout`` runs
  ``nnx.eval_shape`` / ``jax.eval_shape`` on the real train state and gives every leaf its real
  ``NamedSharding``, built on a ``jax.sharding.AbstractMesh`` (axis sizes only), whose
  ``shard_shape`` is each device's block for ANY device count. Gradients are one more
  params-shaped tree in ``param_dtype``. Activations are an estimate (formula in
  ``activation_bytes``).
* **AOT** -- the real train step lowered with ``jax.ShapeDtypeStruct`` inputs and compiled for the
  requested mesh on simulated CPU devices (``--xla_force_host_platform_device_count=N``, in a
  subprocess because the flag must be set before JAX starts); ``compiled.memory_analysis()`` gives
  per-device argument / output / temp bytes. Nothing is allocated, so large models plan on a
  laptop; XLA:CPU's buffer assignment is not TPU's or GPU's, so treat it as a cross-check.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from mtp.config import MESH_AXES, ConfigError, resolve_mesh_shape, validate
from mtp.decode.lower import lower_decode_step
from mtp.sharding import make_mesh
from mtp.train.program import build_program

GIB = 2**30
MESH_FORM = "data=1,fsdp=8,tensor=1"


class PlanError(ValueError):
    """A plan request that cannot work; the message says what was wrong and the expected form."""


# --- mesh ---------------------------------------------------------------------------------------
def parse_mesh(text: str) -> dict[str, int]:
    """``'data=1,fsdp=8,tensor=2'`` -> ``{'data': 1, 'fsdp': 8, 'tensor': 2}``; unnamed axes are 1,
    and one axis may be -1 (fill from --devices)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq:
            raise PlanError(f"--mesh part {part!r} has no '='; expected the form {MESH_FORM!r}.")
        if name not in MESH_AXES:
            raise PlanError(f"--mesh part {part!r}: unknown axis {name!r}; the axes are {MESH_AXES},"
                            f" e.g. {MESH_FORM!r}.")
        if name in seen:
            raise PlanError(f"--mesh part {part!r}: axis {name!r} is given twice; expected {MESH_FORM!r}.")
        try:
            size = int(value)
        except ValueError:
            raise PlanError(f"--mesh part {part!r}: size {value!r} is not an integer;"
                            f" expected the form {MESH_FORM!r}.") from None
        if size == 0 or size < -1:
            raise PlanError(f"--mesh part {part!r}: size must be positive (or -1 to fill from --devices).")
        seen.add(name)
        sizes[name] = size
    if not seen:
        raise PlanError(f"--mesh {text!r} names no axis; expected the form {MESH_FORM!r}.")
    return sizes


def resolve_mesh(mesh_sizes: dict, n_devices: int | None) -> tuple[dict[str, int], int]:
    """Fill a -1 axis and check the product equals ``n_devices`` (default: the product)."""
    sizes = {a: int(mesh_sizes.get(a, 1)) for a in MESH_AXES}
    if n_devices is None:
        if -1 in sizes.values():
            raise PlanError(f"--mesh {sizes} has a -1 axis; pass --devices N so it can be filled.")
        n_devices = math.prod(sizes.values())
    if n_devices < 1:
        raise PlanError(f"--devices {n_devices} is invalid: use a positive device count.")
    try:
        shape = resolve_mesh_shape(sizes, n_devices)
    except ValueError as e:
        raise PlanError(f"{e} (--mesh {','.join(f'{a}={s}' for a, s in sizes.items())},"
                        f" --devices {n_devices})") from None
    return dict(zip(MESH_AXES, shape)), n_devices


# --- analytic -----------------------------------------------------------------------------------
def _shard_bytes(abstract_tree, sharding_tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs under their NamedShardings (the
    largest shard, which is every shard for evenly divided dims)."""
    leaves = jax.tree.leaves(abstract_tree)
    shardings = jax.tree.leaves(sharding_tree)
    assert len(leaves) == len(shardings), (len(leaves), len(shardings))
    total = 0
    for x, sh in zip(leaves, shardings):
        total += math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def _batch_shards(mesh_sizes: dict, rules) -> int:
    return math.prod(mesh_sizes[a] for a in dict(rules).get("batch", ()))


def _div(n: int, shards: int) -> float:
    """``n`` split over ``shards`` if it divides (sharding rules replicate uneven dims)."""
    return n / shards if n % shards == 0 else n


def activation_bytes(spec, cfg, mesh_sizes: dict, rules) -> dict:
    """Per-device activation estimate of one micro-batch's forward + backward.

    With B = micro-batch / batch shards (``data*fsdp``), T = seq_len, D = d_model, c = compute
    dtype bytes, tp = tensor size (applied to heads, d_ff and vocab when they divide), L = trunk
    layers, Nq/Nk query/kv heads, H head_dim, F d_ff, V vocab, C = loss.chunk_size:

    * ``saved``: what the scanned trunk keeps for the backward pass. remat != 'none': the layer
      input ``L * B*T*D*c`` (one residual per layer). remat 'none': every layer keeps its
      intermediates, ``L * (B*T*c*(4D + (2Nq+2Nk)H/tp + 3F/tp) + B*Nq/tp*T*T*c)`` (norm outputs,
      q/k/v/attention output, SwiGLU gate/up/product, and the softmax probabilities).
    * ``layer``: one layer's working set while it runs (or is recomputed):
      ``B*T*c*(4D + (2Nq+2Nk)H/tp + 3F/tp) + B*Nq/tp*T*T*(4 + c)`` (XLA attention materializes
      f32 scores and the probabilities) ``+ B*T*T`` (the bool causal/document mask).
    * ``heads``: the memory-flat loss runs one MTP head at a time with its vjp inside the
      forward: one head layer's saved set (as remat 'none') + its working set (= ``layer``) +
      the chunked logits and their gradient ``2*B*C*V/tp*4`` + f32 accumulators of the trunk
      gradient ``B*T*D*4`` and the unembedding gradient ``D*V*4/(fsdp*tp)``.
    * ``io``: embedding output and trunk output, ``2*B*T*D*c``.
    * ``gathered``: FSDP all-gathers one layer's weights at a time and reduce-scatters its weight
      gradient, so one layer's unsharded (over fsdp; still split over tensor) weights and
      gradient are alive, ``2*P_layer/tp*p`` (p = param dtype bytes), plus the compute-dtype
      unembedding the loss uses, ``D*V/tp*c``.

    With an attention kernel (``model.attention`` resolved to splash / cudnn / pallas_gpu) there
    are no ``T*T`` terms: the kernel keeps the f32 log-sum-exp ``B*Nq/tp*T*4`` instead of the
    probabilities, and the int32 segment ids ``B*T*4`` replace the mask.

    Under loss.impl 'vmap' all heads run at once: ``heads`` is multiplied by n_future and the
    logits term uses the full ``B*T*V`` per head.
    """
    t = cfg.train
    c = jnp.dtype(spec.dtype).itemsize
    B = max(t.batch_size // t.grad_accum // _batch_shards(mesh_sizes, rules), 1)
    T, D, H = t.seq_len, spec.d_model, spec.resolved_head_dim
    tp, fsdp = mesh_sizes["tensor"], mesh_sizes["fsdp"]
    Nq, Nk, F, V = _div(spec.n_heads, tp), _div(spec.n_kv_heads, tp), _div(spec.resolved_d_ff, tp), \
        _div(spec.vocab_size, tp)
    dense_per_token = c * (4 * D + (2 * Nq + 2 * Nk) * H + 3 * F)
    if spec.attention == "xla":
        layer_saved = B * T * dense_per_token + B * Nq * T * T * c
        layer_ws = B * T * dense_per_token + B * Nq * T * T * (4 + c) + B * T * T
    else:  # a fused kernel keeps only its f32 log-sum-exp per query row; the segment ids replace the mask
        layer_saved = B * T * dense_per_token + B * Nq * T * 4
        layer_ws = B * T * dense_per_token + B * Nq * T * 4 + B * T * 4
    saved = spec.trunk_layers * (B * T * D * c if spec.remat != "none" else layer_saved)
    if cfg.loss.impl == "scan":
        chunk = cfg.loss.chunk_size if 0 < cfg.loss.chunk_size < T and T % cfg.loss.chunk_size == 0 else T
        heads = layer_saved + layer_ws + 2 * B * chunk * V * 4 + B * T * D * 4 + D * V * 4 / max(fsdp, 1)
    else:
        heads = spec.n_future * (layer_saved + layer_ws + 2 * B * T * V * 4)
    io = 2 * B * T * D * c
    p = jnp.dtype(spec.param_dtype).itemsize
    gathered = 2 * spec.layer_params() / tp * p + D * V * c
    parts = {"saved": saved, "layer": layer_ws, "heads": heads, "io": io, "gathered": gathered}
    parts = {k: int(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    parts["micro_batch_per_device"] = B
    return parts


# --- AOT ----------------------------------------------------------------------------------------
def _aot_in_process(cfg, mesh_sizes: dict, n_devices: int) -> dict:
    """Lower + compile the real train step with abstract inputs on ``n_devices`` local devices."""
    t0 = time.perf_counter()
    program = build_program(cfg, make_mesh(mesh_sizes, jax.devices()[:n_devices]))
    compiled = program.lower().compile()
    mem = compiled.memory_analysis()
    out = {"argument": int(mem.argument_size_in_bytes), "output": int(mem.output_size_in_bytes),
           "alias": int(mem.alias_size_in_bytes), "temp": int(mem.temp_size_in_bytes)}
    # Donated state is aliased into the output, so it is counted once.
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["attention"] = program.spec.attention
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        out["compiled_flops_per_device"] = float(cost.get("flops", 0.0)) if cost else None
    except Exception:  # cost analysis is optional and backend-dependent
        out["compiled_flops_per_device"] = None
    out["compile_s"] = round(time.perf_counter() - t0, 1)
    return out


def _aot_subprocess(cfg, mesh_sizes: dict, n_devices: int, timeout_s: float, lower: dict | None = None) -> dict:
    """``_aot_in_process`` (or, with ``lower``, ``lower_in_process(**lower)``) in a fresh Python
    whose JAX sees ``n_devices`` simulated CPU devices."""
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    payload = pickle.dumps((cfg.to_dict(), mesh_sizes, n_devices, lower))
    proc = subprocess.run([sys.executable, "-m", "mtp.plan"], input=payload, env=env,
                          capture_output=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        what = "lowering" if lower else "AOT compile"
        raise RuntimeError(f"{what} subprocess failed (exit {proc.returncode}): {' | '.join(tail)}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


# --- lowering for platforms that are not here -----------------------------------------------------
LOWER_PLATFORMS = ("tpu", "cuda")
# custom-call targets that prove an attention kernel is in the module
KERNEL_TARGETS = {"tpu": ("tpu_custom_call",), "cuda": ("__gpu$xla.gpu.triton", "__cudnn$fmha")}
_ITEMSIZE = {"f64": 8, "i64": 8, "ui64": 8, "f32": 4, "i32": 4, "ui32": 4, "bf16": 2, "f16": 2, "i16": 2,
             "i8": 1, "ui8": 1, "i1": 1}


def parse_platforms(text: str) -> tuple[str, ...]:
    platforms = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in platforms if p not in LOWER_PLATFORMS]
    if bad or not platforms:
        raise PlanError(f"--lower-for {text!r}: use a comma-separated subset of {LOWER_PLATFORMS}, e.g. 'tpu,cuda'.")
    return platforms


def module_facts(text: str, seq_len: int, platform: str) -> dict:
    """What a lowered StableHLO module proves: how often each kernel custom-call target occurs, the
    largest tensor type (by bytes), and every tensor shape with two axes of ``seq_len`` (a T x T
    score or mask tensor)."""
    calls = {t: text.count(f"@{t}") + text.count(f'"{t}"') for t in KERNEL_TARGETS[platform]}
    largest, seq_sq = None, set()
    for dims, dtype in set(re.findall(r"tensor<((?:\d+x)+)([a-z]+\d*)>", text)):
        shape = [int(d) for d in dims.rstrip("x").split("x")]
        size = math.prod(shape) * _ITEMSIZE.get(dtype, 4)
        if largest is None or size > largest["bytes"]:
            largest = {"shape": shape, "dtype": dtype, "bytes": size}
        if shape.count(seq_len) >= 2:
            seq_sq.add(f"{'x'.join(map(str, shape))}x{dtype}")
    return {"kernel_calls": calls, "kernel_found": any(calls.values()), "largest_tensor": largest,
            "seq_len_squared_tensors": sorted(seq_sq)}


def lower_in_process(cfg, mesh_sizes: dict, n_devices: int, platforms, lower_dir: str) -> dict:
    """Lower (not run) the real jitted, sharded train step for each platform on ``n_devices`` local
    CPU devices, ``model.attention`` resolved for that platform; write ``lower_dir/train_step.<p>.mlir``
    and report per platform what the module holds (``module_facts``). The speculative verify step
    (``mtp.decode.lower``: batch 1 and 8, every head drafting, a KV cache of ``model.max_seq_len``)
    goes to ``lower_dir/decode_step.<p>.mlir``."""
    os.makedirs(lower_dir, exist_ok=True)
    out = {}
    for platform in platforms:
        t0 = time.perf_counter()
        try:
            program = build_program(cfg, make_mesh(mesh_sizes, jax.devices()[:n_devices]), lower_for=platform)
            text = program.lower(lowering_platforms=(platform,)).as_text()
        except Exception as e:  # reported per platform: the other one may still lower
            out[platform] = {"lowered": False, "error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        path = os.path.join(lower_dir, f"train_step.{platform}.mlir")
        with open(path, "w") as f:
            f.write(text)
        out[platform] = {"lowered": True, "attention": program.spec.attention, "path": path,
                         "module_bytes": len(text), **module_facts(text, cfg.train.seq_len, platform),
                         "lower_s": round(time.perf_counter() - t0, 1)}
        out[platform]["decode_step"] = _lower_decode(program, platform, lower_dir)
    return out


def _lower_decode(program, platform: str, lower_dir: str) -> dict:
    """``decode_step.<platform>.mlir`` of the program's model and mesh, and what it holds."""
    t0 = time.perf_counter()
    try:
        text, cache_specs = lower_decode_step(program.spec, program.mesh, program.rules, platform)
    except Exception as e:  # reported, like the train step's lowering
        return {"lowered": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    path = os.path.join(lower_dir, f"decode_step.{platform}.mlir")
    with open(path, "w") as f:
        f.write(text)
    S = program.spec.max_seq_len
    return {"lowered": True, "path": path, "module_bytes": len(text), "cache_slots": S,
            "kv_cache_sharding": cache_specs, "sharded": "sdy.sharding" in text or "mhlo.sharding" in text,
            "lower_s": round(time.perf_counter() - t0, 1)}


def _in_process_ok(n_devices: int) -> bool:
    """Compile here when this process already runs JAX on enough CPU devices (e.g. the tests)."""
    return jax.default_backend() == "cpu" and jax.device_count() >= n_devices


PLAN_PLATFORMS = ("tpu", "cuda", "cpu")


def parse_platform(text: str) -> str:
    if text not in PLAN_PLATFORMS:
        raise PlanError(f"--platform {text!r}: use one of {PLAN_PLATFORMS}.")
    return text


def default_platform(lower_for: tuple[str, ...] = ()) -> str:
    """The platform planned for when none is given: the first ``--lower-for`` platform, else this
    process's backend ('gpu' named 'cuda')."""
    if lower_for:
        return lower_for[0]
    backend = jax.default_backend()
    return "cuda" if backend == "gpu" else backend


# --- plan ---------------------------------------------------------------------------------------
def plan(cfg, mesh_sizes: dict, n_devices: int | None = None, hbm_gib: float | None = None,
         compile: bool | str = "auto", timeout_s: float = 600.0, lower_for: tuple[str, ...] = (),
         lower_dir: str | None = None, platform: str | None = None) -> dict:
    """Per-device bytes of params / opt_state / grads / activations, FLOPs per token and whether
    it fits in ``hbm_gib`` (None if not given). ``compile``: True, False or 'auto' (try, and fall
    back to the analytic numbers with a note if compiling fails or times out). ``lower_for``:
    platforms ('tpu', 'cuda') to lower the train step for (``lower_in_process``; written to
    ``lower_dir``); the CPU AOT compile is then skipped. ``platform`` ('tpu', 'cuda', 'cpu'; default
    ``default_platform(lower_for)``): where the step is meant to run; ``model.attention`` is resolved
    for it as ``build_program(lower_for=platform)`` does ('auto': tpu -> splash, cuda -> pallas_gpu,
    or cudnn when this process has a GPU, cpu -> xla) and the activation estimate follows it. The AOT
    compile runs on simulated CPU devices, which only compile XLA attention: with a kernel planned it
    compiles the same step with ``model.attention='xla'``, reports it under ``aot`` with
    ``attention: 'xla'``, and ``fits`` then uses the analytic total only (the XLA program's T x T
    scores are not the kernel program's memory)."""
    platform = parse_platform(platform) if platform is not None else default_platform(tuple(lower_for))
    mesh_sizes, n_devices = resolve_mesh(mesh_sizes, n_devices)
    cfg = copy.deepcopy(cfg)
    for a in MESH_AXES:
        cfg.mesh[a] = mesh_sizes[a]
    try:
        validate(cfg, n_devices)
    except ConfigError as e:
        raise PlanError(f"config error for mesh {mesh_sizes}: {e}") from None
    mesh = AbstractMesh(tuple(mesh_sizes[a] for a in MESH_AXES), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES))
    try:
        program = build_program(cfg, mesh, lower_for=platform)
    except ConfigError as e:
        hint = f" (planned for platform {platform!r}; pass --platform tpu|cuda for an accelerator)"
        raise PlanError(f"config error: {e}{hint}") from None
    spec, rules, layout = program.spec, program.rules, program.layout
    params = _shard_bytes(layout.abstract["params"], layout.shardings["params"])
    opt_state = _shard_bytes(layout.abstract["opt_state"], layout.shardings["opt_state"])
    acts = activation_bytes(spec, cfg, mesh_sizes, rules)
    bytes_per_device = {"params": params, "opt_state": opt_state, "grads": params,
                        "activations": acts["total"]}
    total = sum(bytes_per_device.values())
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(layout.abstract["params"]))
    t = cfg.train
    result = {
        "config": cfg.name, "param_count": spec.param_count(), "param_count_eval_shape": n_params,
        "mesh": mesh_sizes, "n_devices": n_devices,
        "batch": {"global": t.batch_size, "grad_accum": t.grad_accum, "seq_len": t.seq_len,
                  "micro_batch_per_device": acts["micro_batch_per_device"]},
        "remat": spec.remat, "loss_impl": cfg.loss.impl, "scan_layers": True, "platform": platform,
        "attention": spec.attention,
        "dtype": spec.dtype, "param_dtype": spec.param_dtype,
        "bytes_per_device": bytes_per_device, "total_bytes_per_device": total,
        "activation_parts": {k: v for k, v in acts.items() if k != "micro_batch_per_device"},
        "flops_per_token": spec.flops_per_token(t.seq_len, cfg.loss.get("mask_anchors", 0)),
        "hbm_gib": hbm_gib, "fits": None, "aot": None, "notes": [],
    }
    _set_fits(result)
    if platform == "cpu" and jax.default_backend() == "cpu" and not lower_for:
        result["notes"].append("planned for platform 'cpu' (this machine; model.attention resolved to"
                               f" {spec.attention!r}): pass --platform tpu|cuda to plan an accelerator pod.")
    if lower_for:
        lower = {"platforms": tuple(lower_for), "lower_dir": os.path.abspath(lower_dir or "lowered")}
        if _in_process_ok(n_devices):
            result["lowered"] = lower_in_process(cfg, mesh_sizes, n_devices, **lower)
        else:
            result["lowered"] = _aot_subprocess(cfg, mesh_sizes, n_devices, timeout_s, lower)
        result["notes"].append("AOT compile skipped: --lower-for plans the accelerator program, which"
                               " this CPU cannot compile.")
        return result
    if compile is False or compile == "no":
        result["notes"].append("AOT compile skipped (compile=False).")
        return result
    aot_cfg = cfg
    if spec.attention != "xla":  # simulated CPU devices compile XLA attention only
        aot_cfg = copy.deepcopy(cfg)
        aot_cfg.model.attention = "xla"
        result["notes"].append(f"AOT numbers are the same step with model.attention='xla' (CPU compiles no"
                               f" {spec.attention} kernel): a cross-check of everything but attention;"
                               " 'fits' uses the analytic total.")
    try:
        if _in_process_ok(n_devices):
            result["aot"] = _aot_in_process(aot_cfg, mesh_sizes, n_devices)
        else:
            result["aot"] = _aot_subprocess(aot_cfg, mesh_sizes, n_devices, timeout_s)
    except subprocess.TimeoutExpired:
        if compile is True or compile == "yes":
            raise
        result["notes"].append(f"AOT compile timed out after {timeout_s:.0f} s; analytic numbers only.")
    except Exception as e:  # 'auto': fall back to the analytic estimate
        if compile is True or compile == "yes":
            raise
        result["notes"].append(f"AOT compile failed ({type(e).__name__}: {e}); analytic numbers only.")
    _set_fits(result)
    return result


def _set_fits(result: dict) -> None:
    """``fits``: the larger of the analytic total and the AOT total (when compiled) <= HBM."""
    need = result["total_bytes_per_device"]
    if result["aot"] and result["aot"].get("attention", result["attention"]) == result["attention"]:
        need = max(need, result["aot"]["total"])
    result["fits_bytes"] = need
    hbm = result["hbm_gib"]
    result["fits"] = None if hbm is None else bool(need <= hbm * GIB)


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_plan(r: dict) -> str:
    """Human-readable table (GiB per device)."""
    def gib(b):
        return f"{b / GIB:9.2f} GiB"

    mesh = ",".join(f"{a}={s}" for a, s in r["mesh"].items())
    b = r["batch"]
    lines = [
        f"plan: {r['config']}  mesh {mesh} ({r['n_devices']} devices)",
        f"  parameters        {r['param_count']:,} ({_billions(r['param_count'])})",
        f"  batch             {b['global']} x {b['seq_len']} tokens, grad_accum {b['grad_accum']},"
        f" {b['micro_batch_per_device']} sequence(s) per device per micro-step",
        f"  remat {r['remat']}, scanned layers, loss.impl {r['loss_impl']},"
        f" compute {r['dtype']}, params {r['param_dtype']}",
        f"  FLOPs per token   {r['flops_per_token']:.3e}",
        f"  platform {r['platform']}: attention {r['attention']}",
        f"  per device (analytic, {r['attention']} attention):",
    ]
    for k, v in r["bytes_per_device"].items():
        lines.append(f"    {k:15s} {gib(v)}")
    lines.append(f"    {'total':15s} {gib(r['total_bytes_per_device'])}")
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r["activation_parts"].items() if k != "total")
    lines.append(f"    (activations GiB: {parts})")
    a = r["aot"]
    if a:
        lines.append(f"  per device (AOT-compiled train step on {r['n_devices']} simulated CPU devices,"
                     f" {a.get('attention', 'xla')} attention, {a['compile_s']} s):")
        for k in ("argument", "output", "alias", "temp", "total"):
            lines.append(f"    {k:15s} {gib(a[k])}")
    if r["hbm_gib"] is not None:
        verdict = "yes" if r["fits"] else "NO"
        same = r["aot"] and r["aot"].get("attention", r["attention"]) == r["attention"]
        basis = "max of analytic and AOT" if same else "analytic"
        lines.append(f"  fits in {r['hbm_gib']:g} GiB HBM: {verdict}"
                     f" (needs {r['fits_bytes'] / GIB:.2f} GiB, {basis})")
    for platform, low in r.get("lowered", {}).items():
        if not low["lowered"]:
            lines.append(f"  lowered for {platform}: FAILED ({low['error'][:300]})")
            continue
        big = low["largest_tensor"]
        lines.append(f"  lowered for {platform}: attention {low['attention']}, kernel calls {low['kernel_calls']},"
                     f" largest tensor {'x'.join(map(str, big['shape']))}x{big['dtype']},"
                     f" T x T tensors {low['seq_len_squared_tensors'] or 'none'} -> {low['path']}")
        dec = low.get("decode_step")
        if dec and dec["lowered"]:
            lines.append(f"  decode step for {platform}: batch 1 and 8, KV cache {dec['cache_slots']} slots sharded"
                         f" {dec['kv_cache_sharding']} -> {dec['path']}")
        elif dec:
            lines.append(f"  decode step for {platform}: FAILED ({dec['error'][:300]})")
    for note in r["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _main() -> None:
    """Subprocess entry: read (config dict, mesh, n_devices, lower) from stdin, print the AOT (or, with
    ``lower``, the lowering) JSON."""
    cfg_dict, mesh_sizes, n_devices, lower = pickle.loads(sys.stdin.buffer.read())
    cfg = ml_collections.ConfigDict(cfg_dict)
    if lower:
        print(json.dumps(lower_in_process(cfg, mesh_sizes, n_devices, **lower)))
    else:
        print(json.dumps(_aot_in_process(cfg, mesh_sizes, n_devices)))


if __name__ == "__main__":
    _main()
