"""Sweep grids: parse ``--sweep KEY=V1,V2,...`` specs, take their cartesian product, and name each
point (its workdir is ``W/<name>``).

Keys are config keys (``model.n_future``, ``optim.lr``, ...) plus the pseudo-key ``model.size``,
a named model shape from ``SIZES`` that expands into real ``model.*`` keys. Every point's config is
built (``load_config`` + overrides) while the grid is made, so an unknown key, a bad value or an
unknown size is an error before anything runs, and the message names the offending spec.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import re
from pathlib import Path

from mtp.config import ConfigError, _flat_keys, _parse_value, base_config, load_config

# CPU-sized model shapes for ``--sweep model.size=...`` (reusable: ``from mtp.sweep import SIZES``).
# ``head_dim``/``d_ff`` are reset to 0 (derived from d_model) so a base config's explicit values do
# not leak into another width. ``m`` and ``l`` have enough layers for ``--parameter-matched`` with up
# to 8 and 12 heads (parameter matching removes n_future-1 trunk layers).
SIZES: dict[str, dict[str, int]] = {
    "xs": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=0, d_ff=0),
    "s": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=0, d_ff=0),
    "m": dict(d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=0, d_ff=0),
    "l": dict(d_model=384, n_layers=12, n_heads=6, n_kv_heads=2, head_dim=0, d_ff=0),
}
SIZE_KEY = "model.size"
PSEUDO_KEYS = (SIZE_KEY,)
_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
MAX_NAME = 96


class SweepError(ValueError):
    """A sweep that cannot run; the message names the spec and the fix."""


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    key: str  # full config key without the --config. prefix, e.g. 'model.n_future'
    values: tuple[str, ...]  # the values as written (parsed later by the config's own parser)


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the grid: the swept values, the config overrides they expand to, its name."""

    name: str
    assignment: tuple[tuple[str, str], ...]  # (key, value as written) per --sweep, in order
    overrides: tuple[str, ...]  # 'key=value' strings for load_config / `mtp train --config.key=value`

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.assignment)

    def workdir(self, root: str | Path) -> Path:
        return Path(root) / self.name

    def train_args(self) -> list[str]:
        return [f"--config.{o}" for o in self.overrides]


def split_values(text: str) -> list[str]:
    """Split at top-level commas: ``1,2`` -> [1, 2]; ``(1,0.5),(1,1)`` -> ['(1,0.5)', '(1,1)']."""
    out, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [v.strip() for v in out]


def parse_spec(text: str) -> SweepSpec:
    """``model.n_future=1,2,4`` -> SweepSpec('model.n_future', ('1', '2', '4'))."""
    if "=" not in text:
        raise SweepError(f"--sweep {text!r} has no '=': write it as KEY=V1,V2,... e.g."
                         " --sweep model.n_future=1,2,4.")
    key, values_text = text.split("=", 1)
    key = key.strip().removeprefix("--config.").removeprefix("config.")
    if not key:
        raise SweepError(f"--sweep {text!r} names no key: write it as KEY=V1,V2,...")
    values = split_values(values_text)
    if any(v == "" for v in values):
        raise SweepError(f"--sweep {text!r} has an empty value; list values like {key}=1,2,4.")
    if len(set(values)) != len(values):
        raise SweepError(f"--sweep {text!r} repeats a value.")
    if key == SIZE_KEY:
        for v in values:
            if v not in SIZES:
                raise SweepError(f"--sweep {text!r}: unknown model size {v!r}; known sizes:"
                                 f" {', '.join(f'{k} ({_describe(s)})' for k, s in SIZES.items())}.")
    else:
        known = _flat_keys(base_config())
        if key not in known:
            close = difflib.get_close_matches(key, list(known) + list(PSEUDO_KEYS), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise SweepError(f"--sweep {text!r}: unknown config key {key!r}.{hint}"
                             " Keys are those of mtp/config.py base_config(), plus model.size.")
    return SweepSpec(key, tuple(values))


def _describe(size: dict) -> str:
    return f"d_model={size['d_model']}, n_layers={size['n_layers']}, n_heads={size['n_heads']}"


def expand(key: str, value: str) -> list[str]:
    """The real ``key=value`` overrides of one swept value (``model.size`` -> several keys)."""
    if key == SIZE_KEY:
        return [f"model.{k}={v}" for k, v in SIZES[value].items()]
    return [f"{key}={value}"]


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The leaf name of each key where unique among the swept keys (``model.n_future`` -> ``n_future``)."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}


def safe_name(text: str) -> str:
    """A directory name: unsafe characters become '_'; long names keep a prefix and a hash."""
    name = _SAFE.sub("_", text).strip(".") or "point"
    if name != text or len(name) > MAX_NAME:  # keep names that sanitize alike apart
        name = f"{name[:MAX_NAME - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return name


def make_grid(specs: list[str] | list[SweepSpec], base_overrides: list[str] = (),
              parameter_matched: bool = False, config_path: str | Path | None = None) -> list[Point]:
    """Every point of the cartesian product of ``specs`` (the first spec varies slowest).

    ``base_overrides`` apply to every point first; ``parameter_matched`` adds
    ``model.parameter_matched=True``. With ``config_path``, each point's full config is loaded, so
    bad values fail here, naming the point.
    """
    specs = [s if isinstance(s, SweepSpec) else parse_spec(s) for s in specs]
    if not specs:
        raise SweepError("a sweep needs at least one --sweep KEY=V1,V2,... spec.")
    keys = [s.key for s in specs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise SweepError(f"--sweep names {dupes[0]!r} twice; list all its values in one spec.")
    extra = [o.removeprefix("--config.") for o in base_overrides]
    if parameter_matched:
        if "model.parameter_matched" in keys:
            raise SweepError("--parameter-matched and --sweep model.parameter_matched=... conflict;"
                             " use one of them.")
        extra.append("model.parameter_matched=True")
    short = _short_keys(keys)
    points, names = [], {}
    for combo in itertools.product(*(s.values for s in specs)):
        assignment = tuple(zip(keys, combo))
        overrides = tuple(extra + [o for k, v in assignment for o in expand(k, v)])
        name = safe_name(",".join(f"{short[k]}={v}" for k, v in assignment))
        if name in names:
            name = f"{name}-{hashlib.sha1(repr(assignment).encode()).hexdigest()[:8]}"
        names[name] = assignment
        point = Point(name, assignment, overrides)
        if config_path is not None:
            point_config(config_path, point)
        points.append(point)
    return points


def point_config(config_path: str | Path, point: Point, root: str | Path | None = None):
    """The full config of ``point`` (workdir ``root/<name>`` when ``root`` is given)."""
    try:
        cfg = load_config(config_path, list(point.overrides))
    except ConfigError as e:
        raise SweepError(f"point {point.label!r}: {e}") from None
    if root is not None:
        cfg.workdir = str(point.workdir(root))
    return cfg


def value_of(cfg, key: str):
    """A (real) config value by dotted key, e.g. ``value_of(cfg, 'model.n_future')``."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def parsed(value: str):
    """A swept value as the config parser reads it (for sorting and plotting)."""
    return _parse_value(value)
