"""Config files by path or by name: ``--config tiny`` is ``configs/tiny.py``; no ``--config`` is
``configs/default.py``. Shared by ``mtp`` and ``mtp sweep``."""

from __future__ import annotations

from pathlib import Path


def _config_dir() -> Path:
    """The installed package ``mtp.configs`` (setup.py maps it to the checkout's configs/, so an
    editable install reads the checkout's files); configs/ beside mtp/ when mtp is not installed."""
    try:
        import mtp.configs
    except ImportError:
        return Path(__file__).resolve().parent.parent / "configs"
    return Path(mtp.configs.__file__).resolve().parent


CONFIG_DIR = _config_dir()


def resolve_config_path(value: str | None) -> Path:
    """The config file that ``--config VALUE`` names: a path, or a file of configs/ without ``.py``."""
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
