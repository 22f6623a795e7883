"""The ``mtp`` command.

    mtp train [--config PATH|NAME] [--workdir DIR] [--config.KEY=VALUE ...]
    mtp bench train [--config PATH|NAME] [--heads 1,2,4,8] [--impls vmap,scan] [--steps N] [--json]

With no ``--config`` the embedded default (configs/default.py) runs. NAME is a file in configs/
without ``.py`` (e.g. ``tiny``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(value: str | None) -> Path:
    if not value:
        return CONFIG_DIR / "default.py"
    path = Path(value)
    if path.exists() or path.suffix == ".py":
        return path
    named = CONFIG_DIR / f"{value}.py"
    if named.exists():
        return named
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__"))
    raise SystemExit(f"mtp: no config {value!r}: not a file and not one of configs/{{{available}}}.py")


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    overrides = [a for a in argv if a.startswith("--config.")]
    return [a for a in argv if not a.startswith("--config.")], overrides


def _load(args, overrides):
    from mtp.config import ConfigError, load_config

    try:
        cfg = load_config(resolve_config_path(args.config), overrides)
    except ConfigError as e:
        raise SystemExit(f"mtp: config error: {e}") from None
    if getattr(args, "workdir", None):
        cfg.workdir = args.workdir
    return cfg


def cmd_train(args, overrides) -> int:
    from mtp.config import ConfigError
    from mtp.train.loop import train

    cfg = _load(args, overrides)
    try:
        train(cfg)
    except ConfigError as e:
        raise SystemExit(f"mtp: config error: {e}") from None
    return 0


def cmd_bench_train(args, overrides) -> int:
    from mtp.bench.train_bench import run_train_bench

    cfg = _load(args, overrides)
    heads = [int(h) for h in args.heads.split(",")]
    impls = args.impls.split(",")
    run_train_bench(cfg, heads, impls, steps=args.steps, as_json=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) a model; defaults to configs/default.py")
    p.add_argument("--config", default=None, help="config file or name in configs/")
    p.add_argument("--workdir", default=None, help="checkpoints, metrics and logs (default runs/NAME)")
    p.set_defaults(func=cmd_train)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    b = bench.add_parser("train", help="step time, throughput, MFU and peak memory per n_future")
    b.add_argument("--config", default=None)
    b.add_argument("--heads", default="1,2,4,8", help="comma-separated n_future values")
    b.add_argument("--impls", default="vmap,scan", help="comma-separated loss implementations")
    b.add_argument("--steps", type=int, default=5, help="timed steps per row (after one warm-up)")
    b.add_argument("--json", action="store_true", help="print one JSON list on stdout")
    b.set_defaults(func=cmd_bench_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = _split_overrides(argv)
    args = build_parser().parse_args(argv)
    return args.func(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
