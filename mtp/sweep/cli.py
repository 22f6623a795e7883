"""``mtp sweep``: train every point of a config grid, resumably, and report the results.

    mtp sweep --config PATH|NAME --sweep model.n_future=1,2,4,6,8 [--sweep model.size=xs,s]
              [--parameter-matched] --workdir W [--config.KEY=VALUE ...]
              [--in-process] [--launcher 'launch/local.sh 2'] [--prompts FILE.jsonl] [--no-tpf]
    mtp sweep ... --emit-jobs [--launcher 'sbatch launch/slurm_gpu.sbatch']   # one command per point
    mtp sweep --workdir W [--report-only]              # the grid stored in W/sweep.json

Each point trains in ``W/<key=value,...>``; rerunning skips finished points and resumes the rest.
``W/results.md``, ``W/results.json`` and ``W/plots/*.png`` are written at the end. The exit status is
nonzero when any point failed.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from mtp.config_files import resolve_config_path
from mtp.log import log
from mtp.sweep.grid import SIZES, SweepError, make_grid, point_config
from mtp.sweep.report import write_report
from mtp.sweep.run import (
    SWEEP_FILE,
    InProcessRunner,
    SubprocessRunner,
    SweepPreempted,
    TokensPerForward,
    TPFOptions,
    collect,
    is_finished,
    read_json,
    run_points,
    train_command,
    write_sweep_file,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="train a grid of configs (resumable) and write a results table and plots",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="base config file or name in configs/")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a swept key and its values (repeat for a cartesian product); model.size takes"
                        f" the named shapes {', '.join(SIZES)}")
    p.add_argument("--parameter-matched", action="store_true",
                   help="set model.parameter_matched=True on every point")
    p.add_argument("--workdir", required=True, help="the sweep directory W; point p trains in W/p")
    p.add_argument("--in-process", action="store_true",
                   help="train points in this process (default: one `mtp train` subprocess per point)")
    p.add_argument("--launcher", default="",
                   help="command prefix for each point's `mtp train` (e.g. 'launch/local.sh 2'); must"
                        " block until the point ends, except with --emit-jobs")
    p.add_argument("--emit-jobs", action="store_true",
                   help="print one shell command per unfinished point (for cluster launchers) and exit")
    p.add_argument("--report-only", action="store_true", help="train nothing; rewrite the results")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help='tokens/forward prompts, {"prompt": ...} per line (default: held-out snippets of'
                        " the data, as in `mtp bench decode`)")
    p.add_argument("--tpf-prompts", type=int, default=4, help="held-out prompts for tokens/forward")
    p.add_argument("--tpf-max-new-tokens", type=int, default=64)
    p.add_argument("--no-tpf", action="store_true", help="do not measure tokens per forward")
    p.set_defaults(func=run)
    return p


def _stored(args, overrides: list[str]) -> tuple[str | None, list[str], list[str], bool]:
    """--config/--sweep/overrides/--parameter-matched, from W/sweep.json when no --sweep is given."""
    if args.sweep:
        return args.config, list(args.sweep), overrides, args.parameter_matched
    meta = read_json(Path(args.workdir) / SWEEP_FILE)
    if not meta:
        raise SystemExit(f"mtp sweep: no --sweep KEY=V1,V2,... given and {args.workdir}/{SWEEP_FILE}"
                         " does not exist; pass --config and at least one --sweep.")
    if overrides or args.config or args.parameter_matched:
        raise SystemExit("mtp sweep: without --sweep the grid comes from"
                         f" {args.workdir}/{SWEEP_FILE}; pass --sweep too to change it.")
    return meta["config"], meta["specs"], meta.get("base_overrides", []), meta.get("parameter_matched", False)


def run(args, overrides: list[str] | None = None) -> int:
    if overrides is None:
        overrides = list(getattr(args, "overrides", None) or [])
    root = Path(args.workdir)
    config, specs, overrides, parameter_matched = _stored(args, list(overrides))
    config_path = resolve_config_path(config)
    try:
        points = make_grid(specs, overrides, parameter_matched, config_path)
    except SweepError as e:
        raise SystemExit(f"mtp sweep: {e}") from None
    meta = {"config": str(config_path), "specs": specs, "keys": [s.split("=", 1)[0].strip()
            .removeprefix("--config.") for s in specs], "base_overrides": overrides,
            "parameter_matched": parameter_matched, "points": [p.name for p in points]}

    if args.emit_jobs:
        launcher = shlex.split(args.launcher)
        write_sweep_file(root, meta)
        for point in points:
            d = point.workdir(root)
            if is_finished(d, point_config(config_path, point).train.steps):
                log(f"# {point.name}: finished; no job")
                continue
            print(shlex.join(launcher + train_command(config_path, point, d, ["mtp"])))
        log(f"# then: mtp sweep --workdir {shlex.quote(str(root))} --report-only")
        return 0

    outcome = None
    if not args.report_only:
        write_sweep_file(root, meta)
        runner = InProcessRunner() if args.in_process else SubprocessRunner(config_path, args.launcher)
        try:
            outcome = run_points(config_path, points, root, runner)
        except SweepPreempted as e:
            log(f"[sweep] {e}")
            return 0
    tpf = TokensPerForward(TPFOptions(enabled=not args.no_tpf, prompts_file=args.prompts,
                                      n_prompts=args.tpf_prompts, max_new_tokens=args.tpf_max_new_tokens))
    rows = collect(config_path, points, root, outcome, tpf)
    paths = write_report(root, rows, meta, tpf.note)
    log(f"[sweep] results: {paths['md']} and {paths['json']}; plots in {root / 'plots'}")
    failed = [r["point"] for r in rows if r["status"] == "failed"]
    if failed:
        log(f"[sweep] {len(failed)} point(s) failed: {', '.join(failed)} (see {paths['md']})")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m mtp.sweep.cli ...``) until ``mtp sweep`` is wired into mtp.cli."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    argv = [a for a in argv if not a.startswith("--config.")]
    parser = argparse.ArgumentParser(prog="mtp")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sweep", *argv])
    return run(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
