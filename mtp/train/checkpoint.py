"""Orbax checkpoints of the train state (+ data-iterator state): async, keep-N, any mesh, and the one
reader every command uses.

The state is saved as a flat ``{key path: array}`` dict, so the on-disk layout does not depend on
Flax/Optax node types, and restored onto whatever shardings the current run's layout asks for (a
different device count or mesh split included).

Reading never destroys or skips progress by mistake. A failed restore is one of:

* **incompatible** -- the checkpoint lacks leaves or has other shapes than this config needs (it
  was written by another model config): refused, nothing touched (``CheckpointIncompatible``);
* **unreadable** -- a permission or I/O error: refused, nothing touched (``CheckpointUnreadable``);
* **damaged** -- truncated or corrupt files: the previous checkpoint is tried, with one warning
  line; ``mtp train`` moves the damaged one aside to ``<step>.damaged-<time>`` (never deleted),
  read-only commands (``mtp generate``, ``mtp eval``, ...) leave it where it is. When every
  checkpoint is damaged, ``NoUsableCheckpoint`` says so: a run never silently starts over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from mtp.distributed import barrier
from mtp.log import log

ITEMS = ("state", "data", "meta")
DAMAGED = "damaged"  # suffix of a checkpoint moved aside: <step>.damaged-<unix time>


class CheckpointError(RuntimeError):
    """A checkpoint problem the user must act on; the message names the cause and the fix."""


class CheckpointIncompatible(CheckpointError):
    """The checkpoint was written for another model/optimizer structure than this config's."""


class CheckpointUnreadable(CheckpointError):
    """A permission or I/O error reading a checkpoint (the files may be intact)."""


class NoUsableCheckpoint(CheckpointError):
    """Checkpoints exist, and every one of them is damaged."""


class _Incompatible(Exception):
    pass


def _flatten(tree) -> tuple[dict, object]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}, treedef


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


IO_ERRNOS = {errno.EIO, errno.ENOSPC, errno.EROFS, errno.ENXIO, errno.EBUSY, errno.ESTALE, errno.EMFILE,
             errno.ENFILE, errno.ETIMEDOUT}


def classify(exc: BaseException) -> str:
    """'permission', 'io', 'incompatible' or 'damaged' for an exception raised while restoring."""
    for e in _chain(exc):
        if isinstance(e, _Incompatible):
            return "incompatible"
        if isinstance(e, PermissionError) or getattr(e, "errno", None) in (errno.EACCES, errno.EPERM):
            return "permission"
        if isinstance(e, OSError) and getattr(e, "errno", None) in IO_ERRNOS:
            return "io"
        text = str(e)
        # TensorStore reports file-system errors as status strings inside ValueError.
        if "PERMISSION_DENIED" in text or "Permission denied" in text:
            return "permission"
        if "Input/output error" in text or "No space left" in text:
            return "io"
        if "is not compatible with the stored shape" in text:
            return "incompatible"
    return "damaged"


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs a traceback per failed read at ERROR level (hundreds of lines on a fallback);
    our own message says what happened, so silence its logger while reading."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "orbax.checkpoint")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# Replica-parallel saving splits every replicated array into one slice per replica; each slice of a
# new shape is a small eager XLA compile. Worth it for big arrays only: below 1 MiB per slice
# (biases, norms, small models) one replica writes the whole array.
with _quiet_orbax():  # Orbax warns that a handler is overridden: that is the point
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=1 << 20), override=True)


def _first_line(exc: BaseException, limit: int = 240) -> str:
    for e in _chain(exc):  # the first exception with a message (they usually name the file)
        text = " ".join(str(e).split())
        if len(text) > 8:
            return f"{type(e).__name__}: {text[:limit]}"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True, create: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def damaged(self) -> list[Path]:
        """Checkpoints moved aside earlier as damaged."""
        return sorted(self.directory.glob(f"*.{DAMAGED}-*")) if self.directory.exists() else []

    def save(self, step: int, state: dict, data_state: dict | None = None,
             meta: dict | None = None, force: bool = False) -> bool:
        flat, _ = _flatten(state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(flat),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta or {}),
        )
        return self.manager.save(step, args=args, force=force)

    # --- reading ----------------------------------------------------------------------------
    def restore(self, step: int, abstract_state: dict, shardings: dict) -> tuple[dict, dict, dict]:
        """State restored onto ``shardings``; plus the saved data-iterator state and metadata."""
        flat_abstract, treedef = _flatten(abstract_state)
        flat_sh, _ = _flatten(shardings)
        self._check_structure(step, flat_abstract)
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=flat_sh[k])
                  for k, v in flat_abstract.items()}
        with _quiet_orbax():
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        flat = out["state"]
        state = jax.tree_util.tree_unflatten(treedef, [flat[k] for k in flat_abstract])
        return state, dict(out["data"] or {}), dict(out["meta"] or {})

    def restore_flat(self, step: int) -> dict:
        """The saved flat state dict of ``step`` on one device, whatever mesh wrote it (a run
        trained on 8 devices decodes on one)."""
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        with _quiet_orbax():
            saved = self._saved_tree(step)
            target = {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=one) for k, v in saved.items()}
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return dict(out["state"])

    def _saved_tree(self, step: int) -> dict:
        """``{key: ArrayMetadata}`` of a checkpoint's state item (shapes and dtypes; no array read)."""
        return dict(ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state"))

    def _check_structure(self, step: int, flat_abstract: dict) -> None:
        """Compare the saved tree's keys and shapes with what this config needs, before reading
        any array: a mismatch is another config's checkpoint, not damage."""
        try:
            with _quiet_orbax():
                saved = self._saved_tree(step)
        except Exception:  # noqa: BLE001 -- unreadable metadata: the restore itself will classify it
            return
        if not saved:
            return
        missing = sorted(set(flat_abstract) - set(saved))
        shapes = {k: (tuple(saved[k].shape), tuple(v.shape)) for k, v in flat_abstract.items()
                  if k in saved and getattr(saved[k], "shape", None) is not None
                  and tuple(saved[k].shape) != tuple(v.shape)}
        if missing or shapes:
            detail = (f"lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}" if missing else
                      "has other shapes: " + ", ".join(f"{k} saved {a} needed {b}"
                                                        for k, (a, b) in list(shapes.items())[:3]))
            raise _Incompatible(f"checkpoint {self.directory}/{step} {detail}")

    def restore_latest(self, abstract_state: dict, shardings: dict, move_damaged: bool = True):
        """The newest readable checkpoint as ``(step, state, data_state, meta)``, or None when the
        directory holds none. Damaged checkpoints are skipped (moved aside when ``move_damaged``);
        incompatible or unreadable ones stop everything (see the module docstring)."""
        return self._newest(lambda s: (s, *self.restore(s, abstract_state, shardings)), move_damaged)

    def read_newest_flat(self, step: int | None = None) -> tuple[dict, int]:
        """Host arrays of the newest readable checkpoint (or exactly ``step``), read-only: damaged
        ones are skipped with a warning and left in place."""
        if step is not None:
            return self._newest(lambda s: (self.restore_flat(s), s), False, steps=[step])
        return self._newest(lambda s: (self.restore_flat(s), s), False)

    def _newest(self, read: Callable[[int], object], move_damaged: bool, steps: list[int] | None = None):
        steps = sorted(self.all_steps() if steps is None else steps, reverse=True)
        failures = []
        for step in steps:
            try:
                return read(step)
            except Exception as e:  # noqa: BLE001 -- classified below; bugs surface as 'damaged' + message
                kind, why = classify(e), _first_line(e)
            where = f"{self.directory}/{step}"
            if kind == "incompatible":
                raise CheckpointIncompatible(
                    f"{why.split(': ', 1)[-1]}: it was written by a different model or optimizer config."
                    " Nothing was changed. Resume with the config that wrote it (WORKDIR/config.json),"
                    " or pass a new --workdir.") from None
            if kind in ("permission", "io"):
                what = "Permission denied" if kind == "permission" else "I/O error"
                raise CheckpointUnreadable(
                    f"{what} reading checkpoint {where} ({why}). Nothing was changed: fix the files'"
                    " permissions or the storage and run the same command again.") from None
            failures.append(f"step {step}: {why}")
            fallback = "falling back to the previous one" if step != steps[-1] else "no older checkpoint"
            aside = self._move_aside(step) if move_damaged else None
            log(f"WARNING: checkpoint {where} is damaged ({why}); {fallback}"
                + (f"; kept as {aside.name}." if aside else "."))
        if failures:
            kept = " They were moved aside (*.damaged-*), not deleted." if move_damaged else ""
            raise NoUsableCheckpoint(
                f"No checkpoint in {self.directory} could be read:\n  " + "\n  ".join(failures) + f"\n{kept}"
                " Restore the files from a backup, or start over explicitly with `mtp train --restart`"
                " (or a new --workdir).")
        return None

    def _move_aside(self, step: int) -> Path | None:
        path = self.directory / str(step)
        target = path.with_name(f"{step}.{DAMAGED}-{int(time.time())}")
        if jax.process_index() == 0 and path.exists():
            path.rename(target)
        if jax.process_count() > 1:
            barrier(f"checkpoint-move-aside-{step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
