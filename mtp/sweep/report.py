"""The sweep's results: ``W/results.json`` (``{"sweep": ..., "rows": [one per point]}``),
``W/results.md`` (a table plus the plots) and PNGs in ``W/plots/`` (matplotlib, Agg backend):

- ``val_loss.png``: validation loss per head (one panel per head, one line per point) from the
  ``split == "validation"`` records of each point's ``metrics.jsonl`` (every ``train.eval_every``
  steps and at the end; with ``eval_every=0`` only the final point exists, drawn as a marker);
- ``train_loss.png``: the same for the training loss records (every ``train.log_every`` steps);
- ``acc_vs_n.png``: final per-head top-1 accuracy vs ``n_future``;
- ``tokens_per_forward.png``: self-speculative tokens per forward pass vs ``n_future``;
- ``cost_vs_n.png``: mean step time and wall time per point vs ``n_future``;
- ``mean_vs_n.png``: per metric (head-1 validation loss and top-1, and the task scores of synthetic
  data: induction score, polynomial exact match), the mean over seeds with standard-error bars.

Seeds: swept keys named ``seed`` or ``*_seed`` (``--sweep seed=0,1,2``) are replicates, not settings:
``aggregate`` groups the points that differ only in them, and results.md's "Mean over seeds" table
and ``results.json``'s ``mean_over_seeds`` give the mean ± standard error of each metric.

The x axis of the "vs n" plots is ``model.n_future`` when it varies, else the first swept key;
points that differ in the other swept keys are separate lines.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from mtp.sweep.grid import parsed
from mtp.sweep.run import read_metrics, write_json

PLOTS = ("val_loss.png", "train_loss.png", "acc_vs_n.png", "tokens_per_forward.png", "cost_vs_n.png",
         "mean_vs_n.png")
TASK_SKIP = ("step", "seconds", "n", "n_targets", "version")


def is_seed_key(key: str) -> bool:
    """A swept key that only reseeds a point (``seed``, ``data.synthetic_seed``, ``*_seed``)."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf == "seed" or leaf.endswith("_seed")


def _metrics(row: dict) -> dict[str, float]:
    out = {}
    if row.get("val_loss"):
        out["head-1 val loss"] = row["val_loss"][0]
    if row.get("val_acc"):
        out["head-1 top-1"] = row["val_acc"][0]
    for k, v in (row.get("task") or {}).items():
        if k not in TASK_SKIP and isinstance(v, (int, float)):
            out[k] = float(v)
    if row.get("wall_s") is not None:
        out["wall (s)"] = row["wall_s"]
    return out


def mean_stderr(xs: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample standard deviation / sqrt(k); None for one value)."""
    k = len(xs)
    mean = sum(xs) / k
    if k < 2:
        return mean, None
    var = sum((x - mean) ** 2 for x in xs) / (k - 1)
    return mean, math.sqrt(var / k)


def aggregate(rows: list[dict], keys: list[str]) -> list[dict]:
    """One entry per point of the grid without its seed keys: the finished seeds' mean and standard
    error of every metric (``{"label", "overrides", "n_future", "params", "seeds", "points",
    "metrics": {name: {"mean", "stderr", "values"}}}``), in grid order."""
    seed_keys = [k for k in keys if is_seed_key(k)]
    groups: dict[str, dict] = {}
    for r in rows:
        kept = {k: v for k, v in r["overrides"].items() if k not in seed_keys}
        label = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in kept.items()) or "all"
        g = groups.setdefault(label, {"label": label, "overrides": kept, "n_future": r["n_future"],
                                      "params": r["params"], "seeds": [], "points": [], "values": {}})
        g["points"].append(r["point"])
        if r["status"] != "finished":
            continue
        g["seeds"].append(",".join(f"{k.rsplit('.', 1)[-1]}={r['overrides'][k]}" for k in seed_keys) or "-")
        for name, v in _metrics(r).items():
            g["values"].setdefault(name, []).append(v)
    out = []
    for g in groups.values():
        values = g.pop("values")
        g["metrics"] = {}
        for name, xs in values.items():
            mean, se = mean_stderr(xs)
            g["metrics"][name] = {"mean": mean, "stderr": se, "values": xs}
        out.append(g)
    return out


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('mtp sweep: the plots need matplotlib, an optional dependency: pip install "mtp[plots]",'
                         " then rerun the same command (finished points are not trained again).") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _x_axis(rows: list[dict], keys: list[str]) -> tuple[str, list[str]]:
    """(x key, the other swept keys): n_future when it varies, else the first swept key."""
    if len({r["n_future"] for r in rows}) > 1 or not keys:
        return "model.n_future", [k for k in keys if k != "model.n_future"]
    return keys[0], keys[1:]


def _x_value(row: dict, x_key: str):
    return row["n_future"] if x_key == "model.n_future" else parsed(row["overrides"][x_key])


def _groups(rows: list[dict], x_key: str, others: list[str]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        label = ",".join(f"{k.rsplit('.', 1)[-1]}={r['overrides'][k]}" for k in others) or "all"
        groups.setdefault(label, []).append(r)
    return groups


def _positions(rows, x_key):
    """Numeric x positions and tick labels (categorical values are placed in order of appearance)."""
    values = [_x_value(r, x_key) for r in rows]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return {id(r): v for r, v in zip(rows, values)}, None
    order = list(dict.fromkeys(str(v) for v in values))
    return {id(r): order.index(str(v)) for r, v in zip(rows, values)}, order


def _finish_x(ax, x_key, ticks, xs=()):
    ax.set_xlabel(x_key.rsplit(".", 1)[-1])
    if ticks is not None:
        ax.set_xticks(range(len(ticks)), ticks)
    elif xs and all(float(x).is_integer() for x in xs):  # n_future: integer ticks at the points
        ax.set_xticks(sorted(set(xs)))


def _curve_plot(plt, rows, split: str, path: Path, title: str) -> None:
    n_heads = max((r["n_future"] for r in rows), default=1)
    cols = min(n_heads, 4)
    rows_n = math.ceil(n_heads / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), squeeze=False)
    drawn = False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for h in range(1, n_heads + 1):
        ax = axes[(h - 1) // cols][(h - 1) % cols]
        for k, r in enumerate(rows):
            recs = [m for m in read_metrics(r["workdir"]) if m.get("split") == split
                    and f"loss/head_{h}" in m]
            if not recs:
                continue
            xs, ys = [m["step"] for m in recs], [m[f"loss/head_{h}"] for m in recs]
            ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, label=r["point"],
                    color=colors[k % len(colors)])
            drawn = True
        ax.set_title(f"head {h} (t+{h})")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{split} loss")
        ax.grid(alpha=0.3)
    for k in range(n_heads, rows_n * cols):
        axes[k // cols][k % cols].axis("off")
    if drawn:
        axes[0][0].legend(fontsize=7)
    else:
        axes[0][0].text(0.5, 0.5, f"no {split} records yet", ha="center", transform=axes[0][0].transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _vs_n_plot(plt, rows, keys, path: Path, ylabel: str, series, title: str, note: str | None) -> None:
    """``series(row) -> {line label: y}``; one line per (group, label); ``note`` is written on it."""
    fig, ax = plt.subplots(figsize=(6, 4))
    x_key, others = _x_axis(rows, keys)
    pos, ticks = _positions(rows, x_key)
    lines: dict[str, list[tuple[float, float]]] = {}
    for group, members in _groups(rows, x_key, others).items():
        for r in members:
            for label, y in series(r).items():
                if y is None:
                    continue
                name = label if group == "all" else f"{label} [{group}]"
                lines.setdefault(name, []).append((pos[id(r)], y))
    for name, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if lines:
        ax.legend(fontsize=7)
    if note:
        ax.text(0.5, 0.5, textwrap.fill(note, 60), ha="center", va="center", fontsize=8,
                transform=ax.transAxes, bbox=dict(facecolor="white", alpha=0.8, edgecolor="0.8"))
    _finish_x(ax, x_key, ticks, list(pos.values()))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cost_plot(plt, rows, keys, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x_key, others = _x_axis(rows, keys)
    pos, ticks = _positions(rows, x_key)
    for ax, field, ylabel in ((axes[0], "step_time_s", "mean step time (s)"),
                              (axes[1], "wall_s", "wall time of the point (s)")):
        any_line = False
        for group, members in _groups(rows, x_key, others).items():
            pts = sorted((pos[id(r)], r[field]) for r in members if r[field] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=group)
                any_line = True
        if any_line and len(_groups(rows, x_key, others)) > 1:
            ax.legend(fontsize=7)
        if not any_line:
            ax.text(0.5, 0.5, "not recorded", ha="center", transform=ax.transAxes)
        _finish_x(ax, x_key, ticks, list(pos.values()))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_title("training cost: steady-state step time")
    axes[1].set_title("training cost: wall time (incl. compile, eval)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean_plot(plt, groups: list[dict], keys: list[str], path: Path) -> None:
    """One panel per metric: mean over seeds with standard-error bars vs n_future (or the first
    non-seed key), one line per setting of the other keys."""
    names = [n for n in dict.fromkeys(n for g in groups for n in g["metrics"]) if n != "wall (s)"]
    names = names or ["head-1 val loss"]
    cols = min(len(names), 3)
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    plain = [k for k in keys if not is_seed_key(k)]
    x_key = "model.n_future" if len({g["n_future"] for g in groups}) > 1 or not plain else plain[0]
    others = [k for k in plain if k != x_key]

    def x_of(g):
        return g["n_future"] if x_key == "model.n_future" else parsed(g["overrides"][x_key])

    numeric = all(isinstance(x_of(g), (int, float)) and not isinstance(x_of(g), bool) for g in groups)
    order = list(dict.fromkeys(str(x_of(g)) for g in groups))
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        lines: dict[str, list] = {}
        for g in groups:
            m = g["metrics"].get(name)
            if m is None:
                continue
            label = ",".join(f"{k.rsplit('.', 1)[-1]}={g['overrides'][k]}" for k in others) or "mean"
            x = x_of(g) if numeric else order.index(str(x_of(g)))
            lines.setdefault(label, []).append((x, m["mean"], m["stderr"] or 0.0, len(m["values"])))
        for j, (label, pts) in enumerate(lines.items()):
            pts.sort()
            dx = (j - (len(lines) - 1) / 2) * 0.04 * (max(p[0] for p in pts) - min(p[0] for p in pts) or 1)
            ax.errorbar([p[0] + dx for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                        marker="o", capsize=3, label=f"{label} (k={max(p[3] for p in pts)})")
        if lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no finished points", ha="center", transform=ax.transAxes)
        ax.set_title(name)
        _finish_x(ax, x_key, None if numeric else order, [x_of(g) for g in groups] if numeric else ())
        ax.grid(alpha=0.3)
    for k in range(len(names), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("mean over seeds, bars: one standard error")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_plots(root: Path, rows: list[dict], keys: list[str], tpf_note: str | None = None) -> list[Path]:
    plt = _plt()
    out = Path(root) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    p = {name: out / name for name in PLOTS}
    _curve_plot(plt, rows, "validation", p["val_loss.png"], "validation loss per head")
    _curve_plot(plt, rows, "train", p["train_loss.png"], "training loss per head")
    done = [r for r in rows if r["status"] == "finished"]
    _vs_n_plot(plt, done, keys, p["acc_vs_n.png"], "final top-1 accuracy (validation)",
               lambda r: {f"head {i + 1}": a for i, a in enumerate(r["val_acc"] or [])},
               "final per-head top-1 accuracy", None if done else "no finished points")
    _vs_n_plot(plt, done, keys, p["tokens_per_forward.png"], "tokens per forward",
               lambda r: {"tokens/forward": r["tokens_per_forward"]},
               "self-speculative decoding: tokens per forward",
               tpf_note if tpf_note or any(r["tokens_per_forward"] for r in done)
               else "tokens/forward not available")
    _cost_plot(plt, rows, keys, p["cost_vs_n.png"])
    _mean_plot(plt, aggregate(rows, keys), keys, p["mean_vs_n.png"])
    return [p[name] for name in PLOTS]


# --- tables ---------------------------------------------------------------------------------
def _fmt(x, spec: str = ".3f") -> str:
    if x is None:
        return "–"
    return format(x, spec)


def _per_head(xs, spec: str) -> str:
    return " / ".join(format(x, spec) for x in xs) if xs else "–"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _pm(m: dict | None, spec: str = ".3f") -> str:
    if m is None:
        return "–"
    return format(m["mean"], spec) + ("" if m["stderr"] is None else f" ± {format(m['stderr'], spec)}")


def mean_table(groups: list[dict], seed_keys: list[str]) -> list[str]:
    """Markdown lines: one row per grid point without its seed keys, mean ± standard error."""
    names = list(dict.fromkeys(n for g in groups for n in g["metrics"]))
    over = ", ".join(f"`{k}`" for k in seed_keys) or "no seed key (one run per point)"
    lines = [f"## Mean over seeds ({over})", "",
             "Mean ± standard error (sample standard deviation / sqrt(k)) over the k finished seeds;"
             " task columns (synthetic data) come from `mtp.evals.task_eval.task_scores` (teacher forced,"
             " head 1).", "",
             "| point | n | params | k | " + " | ".join(names) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for g in groups:
        spec = {n: (".1f" if n == "wall (s)" else ".3f") for n in names}
        lines.append(f"| `{g['label']}` | {g['n_future']} | {_params(g['params'])} | {len(g['seeds'])} | "
                     + " | ".join(_pm(g["metrics"].get(n), spec[n]) for n in names) + " |")
    return lines + [""]


def results_markdown(rows: list[dict], meta: dict, plots: list[Path], root: Path,
                     tpf_note: str | None) -> str:
    lines = ["# Sweep results", ""]
    lines.append(f"Config `{meta.get('config')}`; sweep {', '.join(f'`{s}`' for s in meta.get('specs', []))}"
                 + (f"; base overrides {', '.join(f'`{o}`' for o in meta['base_overrides'])}"
                    if meta.get("base_overrides") else "")
                 + ("; parameter matched" if meta.get("parameter_matched") else "") + ".")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "failed", "pending")}
    lines += [f"{len(rows)} points: {counts['finished']} finished, {counts['failed']} failed,"
              f" {counts['pending']} pending.", ""]
    lines.append("Per-head columns list heads 1..n (head i predicts token t+i) on the held-out split;"
                 " step time and tokens/s are steady-state means from `metrics.jsonl`"
                 " (the first, compiling step excluded); wall time is what the sweep measured"
                 " (all attempts, incl. data, compile and evaluation).")
    lines.append("")
    lines.append("| point | status | n | params | val loss per head | top-1 per head | step time (s) |"
                 " tokens/s | wall (s) | tokens/forward |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        lines.append(
            f"| `{r['point']}` | {r['status']} | {r['n_future']} | {_params(r['params'])} |"
            f" {_per_head(r['val_loss'], '.3f')} | {_per_head(r['val_acc'], '.3f')} |"
            f" {_fmt(r['step_time_s'], '.4f')} | {_fmt(r['tokens_per_s'], ',.0f')} |"
            f" {_fmt(r['wall_s'], '.1f')} | {_fmt(r['tokens_per_forward'], '.2f')} |")
    lines.append("")
    groups = aggregate(rows, list(meta.get("keys", [])))
    if any(g["metrics"] for g in groups):
        lines += mean_table(groups, [k for k in meta.get("keys", []) if is_seed_key(k)])
    notes = []
    if tpf_note:
        notes.append(tpf_note)
    for r in rows:
        if r.get("tokens_per_forward_error"):
            notes.append(f"tokens/forward of `{r['point']}` failed: {r['tokens_per_forward_error']}")
        if r.get("task_error"):
            notes.append(f"task scores of `{r['point']}` failed: {r['task_error']}")
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["## Failed points", ""]
        for r in failed:
            lines += [f"### `{r['point']}`", "", str(r.get("error")), "", "```",
                      (r.get("error_tail") or "").strip()[-2000:], "```", ""]
    lines += ["## Plots", ""]
    for p in plots:
        rel = p.relative_to(root)
        lines += [f"![{p.stem}]({rel.as_posix()})", ""]
    return "\n".join(lines)


def write_report(root: str | Path, rows: list[dict], meta: dict, tpf_note: str | None = None) -> dict:
    """Write results.json, results.md and the plots; returns their paths."""
    root = Path(root)
    keys = list(meta.get("keys", []))
    plots = make_plots(root, rows, keys, tpf_note)
    write_json(root / "results.json", {"sweep": {**meta, "tokens_per_forward_note": tpf_note}, "rows": rows,
                                       "mean_over_seeds": aggregate(rows, keys)})
    (root / "results.md").write_text(results_markdown(rows, meta, plots, root, tpf_note))
    return {"json": root / "results.json", "md": root / "results.md", "plots": plots}
