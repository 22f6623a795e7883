"""``mtp study``: the retrofitting comparison of Mehra et al. 2025 on one pretrained NTP workdir.

Rows ``{method, k, top1, top5}`` for k = 2..4 (head k / the marginal predicts token t+k), all on
the same held-out data:

- ``marginal_m{1,8,64}``: no training; ``p(x_{t+k}|x_{<=t})`` by summing the NTP model over the
  intermediate tokens, truncated to the top-m candidates per step (``mtp.decode.marginal``; where
  ``m^(k-1)`` paths per position would exceed ``--max-paths``, the top-m PATHS per depth are kept
  instead, and the row says ``truncation='beam'``).
- ``frozen_L{l}``: three new transformer-layer heads on the frozen model, branching after trunk
  layer l (``model.branch_layer``; the last entry of ``--layers`` may be the full depth), trained
  ``--steps`` steps; head 1 is the model's own (``train.trainable='new_heads'``).
- ``frozen_weighted``: the same heads fed a learned softmax mix of all hidden layers
  (``model.hidden_mix='weighted'``).
- ``joint_full``: heads and backbone trained together (``train.trainable='all'``), the NTP loss kept
  in with weight ``--ntp-weight``, the backbone at ``--lr`` x ``--joint-lr-scale``
  (``optim.backbone_lr_scale``; a pretrained trunk at the new heads' rate forgets NTP);
  ``joint_lora``: the backbone through rank-``--lora-rank`` LoRA adapters only. Both report how
  far the NTP (head 1) loss moved.

Writes ``OUT/study.json``, ``OUT/study.md`` and ``OUT/study.png`` after every finished method (a
stopped study keeps what it measured); each trained row keeps its workdir under ``OUT/runs/``.
Rerunning the same command resumes: rows already in ``study.json`` (same settings) are kept and
trained rows reuse their finished workdirs. A ``study.json`` written with other settings is kept
as ``study.<time>.json`` and the study starts over.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mtp.config import ConfigError
from mtp.decode.marginal import marginal_eval
from mtp.evals.heads_eval import _data_cfg, evaluate_heads, validation_batches
from mtp.log import log
from mtp.train.loop import train
from mtp.workdir import WorkdirError, load_config_json, load_model

DATA_SOURCES = {
    "code": {"source": "stdlib", "glob": "**/*.py"},
    # English prose that Debian-family machines carry locally: package documentation in Markdown
    "text": {"source": "/usr/share/doc", "glob": "**/*.md"},
}


def data_overrides(data: str) -> dict:
    if data in DATA_SOURCES:
        return dict(DATA_SOURCES[data])
    path = Path(data)
    if path.is_dir():
        return {"source": str(path), "glob": "**/*"}
    if any(c in data for c in "*?["):
        return {"source": data, "glob": "**/*"}
    raise ValueError(f"--data {data!r}: use 'code', 'text', a directory or a glob of text files.")


def _row_config(src: Path, out: Path, name: str, data: dict, steps: int, batch_size: int, seq_len: int,
                model: dict, trainable: str, head_weights: tuple, lr: float, backbone_lr_scale: float = 1.0):
    cfg = load_config_json(src)
    cfg.name = f"study-{name}"
    cfg.workdir = str(out / "runs" / name)
    cfg.model.n_future = 4
    for k, v in model.items():
        cfg.model[k] = v
    cfg.data.update(data)
    if (src / "tokenizer.json").exists():
        cfg.data.tokenizer, cfg.data.tokenizer_path = "pretrained", str(src)
    cfg.init.workdir, cfg.init.new_heads = str(src), "copy_last"
    cfg.train.trainable = trainable
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = steps, batch_size, seq_len
    cfg.train.log_every = max(1, min(10, steps))
    cfg.train.checkpoint_every = steps
    cfg.train.eval_batches = 2
    cfg.train.tensorboard = False
    cfg.loss.head_weights = head_weights
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay = lr, max(1, steps // 10), 0.0
    cfg.optim.backbone_lr_scale = backbone_lr_scale if trainable == "all" else 1.0
    return cfg


def _check_row_dirs(out: Path, names: list[str], steps: int) -> None:
    """A trained row's workdir from a study with another --steps would resume under a different
    schedule: refuse before any work is done."""
    for name in names:
        cfg_path = out / "runs" / name / "config.json"
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text()).get("train", {}).get("steps")
            if old != steps:
                raise ValueError(f"{cfg_path.parent} was trained for {old} steps, not --steps {steps}: use a new "
                                 "--out for a study of another length (or move that directory away).")


def _train_row(cfg) -> Path:
    workdir = Path(cfg.workdir)
    done = workdir / "eval.json"
    if done.exists() and json.loads(done.read_text()).get("step") == cfg.train.steps:
        log(f"{cfg.name}: already trained, reusing {workdir}", prefix="study")
    elif train(cfg).preempted:
        log(f"{cfg.name} was preempted; its checkpoint is saved. Rerun the same command to resume the study.",
            prefix="study")
        raise SystemExit(0)
    return workdir


def _eval_rows(method: str, workdir: Path, data: dict, batches: int, seq_len: int, batch_size: int,
               extra: dict | None = None) -> list[dict]:
    loaded = load_model(workdir)
    result = evaluate_heads(loaded, data, batches=batches, seq_len=seq_len, batch_size=batch_size)
    rows = []
    for h in result["heads"]:
        if h["head"] >= 2:
            rows.append({"method": method, "k": h["head"], "top1": h["top1"], "top5": h["top5"],
                         "loss": h["loss"], **(extra or {})})
    rows.append({"method": method, "k": 1, "top1": result["heads"][0]["top1"], "top5": result["heads"][0]["top5"],
                 "loss": result["heads"][0]["loss"], **(extra or {})})
    return rows


def heldout_sequences(loaded, data: dict, n: int, seq_len: int) -> list[list[int]]:
    """Single-document stretches of held-out rows (the marginal must not cross documents)."""
    batches = validation_batches(loaded, _data_cfg(loaded, data), batches=max(1, n // 4 + 1), seq_len=seq_len,
                                 batch_size=4)
    seqs = []
    for b in batches:
        for tokens, seg in zip(b["tokens"], b["segment_ids"]):
            first = tokens[seg == seg[0]] if seg[0] else tokens[:0]
            if len(first) >= 16:
                seqs.append([int(x) for x in first])
    return seqs[:n]


def _settings(**kw) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}


def _resume(out: Path, settings: dict) -> tuple[list[dict], dict | None]:
    """Rows of an earlier run of the same study (same settings); an earlier file with other
    settings is renamed, never overwritten."""
    path = out / "study.json"
    if not path.exists():
        return [], None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        old = {}
    if old.get("settings") == settings:
        rows = old.get("rows", [])
        log(f"resuming: {len(rows)} rows already in {path}", prefix="study")
        return rows, old.get("ntp")
    keep = out / f"study.{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.rename(keep)
    log(f"{path} was written with other settings: kept as {keep.name}, starting over", prefix="study")
    return [], None


def run_study(workdir: str | Path, data: str, steps: int, out: str | Path, *, layers=None, ms=(1, 8, 64),
              positions: int = 64, max_paths: int = 4096, batch_size: int = 4, seq_len: int = 256,
              eval_batches: int = 4, lr: float = 1e-3, ntp_weight: float = 1.0, lora_rank: int = 8,
              joint_lr_scale: float = 0.05, methods=None) -> dict:
    src, out = Path(workdir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dover = data_overrides(data)
    if not 0 < joint_lr_scale <= 1:
        raise ValueError(f"--joint-lr-scale {joint_lr_scale}: use a factor in (0, 1] (the backbone's learning "
                         "rate in joint_full is --lr times this).")
    base = load_model(src)
    L = base.spec.trunk_layers
    if base.spec.n_future != 1:
        log(f"note: {src} has n_future={base.spec.n_future}; the study treats head 1 as the NTP model", prefix="study")
    layers = sorted(set(layers or [max(1, L // 3), max(1, 2 * L // 3), L]))
    bad = [x for x in layers if not 1 <= x <= L]
    if bad:
        raise ValueError(f"--layers {bad}: trunk layers run 1..{L} ({L} = the full trunk).")
    wanted = set(methods or ["marginal", "frozen", "frozen_weighted", "joint_full", "joint_lora"])
    common = dict(data=dover, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr)
    zero_ntp = (0.0, 1.0, 1.0, 1.0)
    trained = []
    if "frozen" in wanted:
        for layer in layers:
            model = {"branch_layer": 0 if layer == L else layer, "hidden_mix": "none"}
            trained.append((f"frozen_L{layer}", model, "new_heads", zero_ntp))
    if "frozen_weighted" in wanted:
        trained.append(("frozen_weighted", {"branch_layer": 0, "hidden_mix": "weighted"}, "new_heads", zero_ntp))
    ntp = (ntp_weight, 1.0, 1.0, 1.0)
    if "joint_full" in wanted:
        trained.append(("joint_full", {"branch_layer": 0, "hidden_mix": "none"}, "all", ntp))
    if "joint_lora" in wanted:
        trained.append(("joint_lora", {"branch_layer": 0, "hidden_mix": "none", "lora_rank": lora_rank}, "lora",
                        ntp))
    _check_row_dirs(out, [name for name, *_ in trained], steps)
    settings = _settings(workdir=str(src.resolve()), data=data, steps=steps, layers=layers, ms=ms,
                         positions=positions, max_paths=max_paths, batch_size=batch_size, seq_len=seq_len,
                         eval_batches=eval_batches, lr=lr, ntp_weight=ntp_weight, lora_rank=lora_rank,
                         joint_lr_scale=joint_lr_scale)
    rows, ntp_ref = _resume(out, settings)
    started = time.time()
    result = {"ntp": ntp_ref, "workdir": str(src), "data": data, "data_config": dover, "steps": steps,
              "layers": layers, "trunk_layers": L, "settings": settings, "rows": rows, "complete": False}

    def have(method: str, k: int | None = None) -> bool:
        return any(r["method"] == method and (k is None or r["k"] == k) for r in rows)

    def save() -> None:
        result["seconds_this_run"] = time.time() - started
        (out / "study.json").write_text(json.dumps(result, indent=1))
        (out / "study.md").write_text(format_study(result))

    if "marginal" in wanted:
        seqs = None
        for m in ms:
            for k in (2, 3, 4):
                if have(f"marginal_m{m}", k):
                    continue
                if seqs is None:
                    seqs = heldout_sequences(base, dover, n=max(1, positions // 8), seq_len=seq_len)
                    per_seq = max(1, positions // max(len(seqs), 1))
                truncation = "per_step" if m ** (k - 1) <= max_paths else "beam"
                log(f"marginal m={m} k={k} ({truncation}), {len(seqs)} sequences x {per_seq} positions", prefix="study")
                res = marginal_eval(base.model, seqs, ks=(k,), ms=(m,), positions_per_seq=per_seq,
                                    truncation=truncation, progress=True)
                r = res["rows"][0]
                rows.append({"method": f"marginal_m{m}", "k": k, "top1": r["top1"], "top5": r["top5"],
                             "agree_greedy": r["agree_greedy"], "mass": r["mass"], "truncation": truncation,
                             "positions": res["positions"]})
                save()
    if trained and result["ntp"] is None:  # head 1 of the source on the trained rows' eval batches
        ref = _eval_rows("base", src, dover, eval_batches, seq_len, batch_size)[-1]
        result["ntp"] = {key: ref[key] for key in ("top1", "top5", "loss")}
        save()
    for name, model, trainable, weights in trained:
        if have(name):
            log(f"{name}: already in study.json", prefix="study")
            continue
        log(f"{name}: training {steps} steps ({trainable})", prefix="study")
        cfg = _row_config(src, out, name, model=model, trainable=trainable, head_weights=weights,
                          backbone_lr_scale=joint_lr_scale, **common)
        wd = _train_row(cfg)
        extra = {}
        if trainable in ("all", "lora"):
            extra = {"ntp_loss_before": result["ntp"]["loss"]}
        row_set = _eval_rows(name, wd, dover, eval_batches, seq_len, batch_size, extra)
        if extra:
            for r in row_set:
                r["ntp_loss_after"] = row_set[-1]["loss"]
        rows.extend(r for r in row_set if r["k"] >= 2)
        save()
    result["complete"] = True
    save()
    plot_study(result, out / "study.png")
    log(f"wrote {out}/study.json, study.md, study.png in {time.time() - started:.0f} s", prefix="study")
    return result


def format_study(result: dict) -> str:
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    lines = [f"# Retrofitting study: {result['workdir']} on {result['data']}", "",
             f"{result['steps']} training steps per trained row; trunk has {result['trunk_layers']} layers."
             + ("" if result.get("complete", True) else
                " **Partial: not every row is measured yet (the same command resumes).**"),
             ""]
    ntp = result.get("ntp")
    if ntp:
        lines += [f"Head 1 (the source's own next-token prediction, k=1) on the trained rows' evaluation batches:"
                  f" top-1 {ntp['top1']:.3f}, top-5 {ntp['top5']:.3f}, loss {ntp['loss']:.3f}.", ""]
    lines += ["| method | k=2 top1 | k=2 top5 | k=3 top1 | k=3 top5 | k=4 top1 | k=4 top5 | notes |",
              "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        by_k = {r["k"]: r for r in result["rows"] if r["method"] == m}
        cells = []
        for k in (2, 3, 4):
            r = by_k.get(k)
            cells += [f"{r['top1']:.3f}", f"{r['top5']:.3f}"] if r else ["—", "—"]
        any_row = next(iter(by_k.values()))
        notes = []
        if "ntp_loss_before" in any_row:
            notes.append(f"NTP loss {any_row['ntp_loss_before']:.3f} -> {any_row['ntp_loss_after']:.3f}")
        if "truncation" in any_row:
            notes.append(", ".join(f"k={k}: {r['truncation']}" for k, r in sorted(by_k.items())))
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def plot_study(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"mtp study: {path.parent}/study.json and study.md are written; the plot needs"
                         ' matplotlib, an optional dependency: pip install "mtp[plots]".') from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in dict.fromkeys(r["method"] for r in result["rows"]):
        rs = sorted((r for r in result["rows"] if r["method"] == m), key=lambda r: r["k"])
        for ax, key in zip(axes, ("top1", "top5")):
            ax.plot([r["k"] for r in rs], [r[key] for r in rs], marker="o", label=m)
    for ax, key in zip(axes, ("top-1", "top-5")):
        ax.set_xlabel("k (predicts token t+k)")
        ax.set_ylabel(f"{key} accuracy")
        ax.set_xticks([2, 3, 4])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{Path(result['workdir']).name} on {result['data']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(sub) -> None:
    p = sub.add_parser("study", help="Mehra et al. retrofitting comparison on a pretrained workdir")
    p.add_argument("--workdir", required=True, help="an NTP workdir (e.g. mtp convert of SmolLM2)")
    p.add_argument("--data", default="code", help="code | text | a directory or glob of text files")
    p.add_argument("--steps", type=int, default=200, help="training steps per trained row")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", default=None, help="branch layers for frozen_L rows, e.g. 10,20,29")
    p.add_argument("--ms", default="1,8,64", help="marginalization widths")
    p.add_argument("--positions", type=int, default=64, help="held-out positions for the marginal rows")
    p.add_argument("--max-paths", type=int, default=4096,
                   help="marginal rows: intermediate paths per position; m^(k-1) above it switches to a beam")
    p.add_argument("--methods", default=None,
                   help="subset of marginal,frozen,frozen_weighted,joint_full,joint_lora (default all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--ntp-weight", type=float, default=1.0)
    p.add_argument("--joint-lr-scale", type=float, default=0.05,
                   help="joint_full: the backbone learns at --lr times this (heads at --lr)")
    p.set_defaults(func=_cmd)


def _cmd(args, overrides) -> int:
    try:
        result = run_study(args.workdir, args.data, args.steps, args.out,
                           layers=[int(x) for x in args.layers.split(",")] if args.layers else None,
                           ms=tuple(int(x) for x in args.ms.split(",")), positions=args.positions,
                           max_paths=args.max_paths,
                           batch_size=args.batch_size, seq_len=args.seq_len, eval_batches=args.eval_batches,
                           lr=args.lr, ntp_weight=args.ntp_weight, lora_rank=args.lora_rank,
                           joint_lr_scale=args.joint_lr_scale,
                           methods=args.methods.split(",") if args.methods else None)
    except (ValueError, ConfigError, WorkdirError) as e:
        raise SystemExit(f"mtp study: {e}") from None
    print(format_study(result))
    return 0

