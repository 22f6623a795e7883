"""Orbax checkpoints of the train state (+ data-iterator state), async, keep-N, any mesh.

The state is saved as a flat ``{key path: array}`` dict, so the on-disk layout does not depend on
Flax/Optax node types, and restored onto whatever shardings the current run's layout asks for (a
different device count or mesh split included).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

# Replica-parallel saving splits every replicated array into one slice per replica; each slice of a
# new shape is a small eager XLA compile. Worth it for big arrays only: below 1 MiB per slice
# (biases, norms, small models) one replica writes the whole array.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=1 << 20), override=True)


def _flatten(tree) -> tuple[dict, object]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}, treedef


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: dict | None = None,
             meta: dict | None = None, force: bool = False) -> bool:
        flat, _ = _flatten(state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(flat),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta or {}),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: dict, shardings: dict) -> tuple[dict, dict, dict]:
        """State restored onto ``shardings``; plus the saved data-iterator state and metadata."""
        flat_abstract, treedef = _flatten(abstract_state)
        flat_sh, _ = _flatten(shardings)
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=flat_sh[k])
                  for k, v in flat_abstract.items()}
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        flat = out["state"]
        missing = sorted(set(target) - set(flat))
        if missing:
            raise ValueError(f"Checkpoint step {step} in {self.directory} lacks {missing[:5]}: it was"
                             " written by a different model config. Use a fresh --workdir.")
        state = jax.tree_util.tree_unflatten(treedef, [flat[k] for k in flat_abstract])
        return state, dict(out["data"] or {}), dict(out["meta"] or {})

    def restore_latest(self, abstract_state: dict, shardings: dict):
        """Restore the newest readable checkpoint: ``(step, state, data_state, meta)`` or None when
        there is none. A checkpoint that fails to restore (corrupted or partial files) is moved
        aside to ``<step>.unreadable-<time>`` (never deleted) with a warning, and the previous one
        is tried; if every checkpoint fails, the error says so instead of silently starting over."""
        steps = sorted(self.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                return (step, *self.restore(step, abstract_state, shardings))
            except Exception as e:  # noqa: BLE001 -- any failure means this checkpoint is unusable
                failures.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
                print(f"WARNING: checkpoint {self.directory}/{step} could not be restored"
                      f" ({type(e).__name__}: {str(e)[:200]}); falling back to the previous one.",
                      file=sys.stderr, flush=True)
                self._move_aside(step)
        if failures:
            raise RuntimeError(
                f"No checkpoint in {self.directory} could be restored:\n  " + "\n  ".join(failures)
                + "\nThey were moved aside (*.unreadable-*), not deleted. Inspect them, or start a"
                " new run with another --workdir.")
        return None

    def _move_aside(self, step: int) -> None:
        import jax

        path = self.directory / str(step)
        if jax.process_index() == 0 and path.exists():
            path.rename(path.with_name(f"{step}.unreadable-{int(time.time())}"))
        if jax.process_count() > 1:
            from mtp.distributed import barrier

            barrier(f"checkpoint-move-aside-{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
