"""Device mesh from config and logical-axis rules that map parameter/activation axes to it.

Parameters carry logical axis names (``vocab, embed, mlp, q_heads, kv_heads, head_dim, layers,
mtp_heads``); activations use ``batch`` and friends. A rule list in the config maps each logical
name to zero or more mesh axes (``data, fsdp, tensor``). A dimension whose size is not divisible by
its mesh axes is replicated instead, so odd shapes (e.g. 3 kv heads on tensor=2) still run. The
axes, the default rules and their parsing (``rules_from_config``) are part of the schema in
``mtp.config``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtp.config import MESH_AXES, resolve_mesh_shape


def make_mesh(mesh_cfg, devices: Sequence | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh; with ``mesh.dcn_data = S > 1`` the data axis spans S slices.

    Multi-slice: each slice (a TPU slice, or a process where all devices are in one slice)
    holds a (data/S, fsdp, tensor) ICI mesh and the slices are stacked along data, so only the
    data-parallel gradient reduction crosses the slower data-center network (DCN).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    dcn = int(mesh_cfg.get("dcn_data", 1))  # mtp plan passes a plain {axis: size} dict
    if dcn == 1:
        device_array = np.asarray(devices).reshape(shape)
    else:
        if shape[0] % dcn:
            raise ValueError(f"mesh.dcn_data={dcn} must divide mesh.data={shape[0]}.")
        # Devices of one slice (CPU, GPU clusters) all report slice 0: processes are the granules.
        by_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1
        try:
            device_array = mesh_utils.create_hybrid_device_mesh(
                (shape[0] // dcn, *shape[1:]), (dcn, 1, 1), devices, process_is_granule=by_process)
        except ValueError as e:
            granule = "process" if by_process else "slice"
            raise ValueError(f"mesh.dcn_data={dcn}: cannot lay {len(devices)} devices out as {dcn}"
                             f" slices (one per {granule}) of data={shape[0] // dcn} x fsdp={shape[1]} x"
                             f" tensor={shape[2]} ({e}). Set mesh.dcn_data to the number of"
                             f" {granule}{'es' if by_process else 's'}, or 1.") from None
    return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules) -> PartitionSpec:
    """Mesh PartitionSpec for an array with these logical axes and shape.

    A mesh axis is used at most once per array (first dimension wins); a dimension not divisible
    by the product of its mesh axes is replicated.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1) if name else ()
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def param_shardings(abstract_state, mesh: Mesh, rules):
    """NamedShardings for an ``nnx.State`` whose Variables carry ``out_sharding`` logical names."""
    def one(v):
        names = v.get_metadata().get("out_sharding") or (None,) * len(v.shape)
        return v.replace(NamedSharding(mesh, logical_to_spec(names, v.shape, mesh, rules)))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# --- activation constraints ------------------------------------------------------------------
_CONTEXT: list[tuple[Mesh, tuple]] = []


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules) -> Iterator[None]:
    """Within this context ``constrain`` pins activations to the mesh; outside it is a no-op."""
    _CONTEXT.append((mesh, rules))
    try:
        yield
    finally:
        _CONTEXT.pop()


def current_activation_rules() -> tuple[Mesh, tuple] | None:
    """The innermost ``activation_rules`` context's ``(mesh, rules)``, or None outside one."""
    return _CONTEXT[-1] if _CONTEXT else None


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    if not _CONTEXT:
        return x
    mesh, rules = _CONTEXT[-1]
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Sharding of host batches ``[B, T, ...]``: batch axis over the batch mesh axes."""
    axes = tuple(a for a in dict(rules).get("batch", ()) if mesh.shape[a] > 1)
    first = axes[0] if len(axes) == 1 else (axes or None)
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))



def rows_sharding(shape, mesh: Mesh, rules) -> NamedSharding:
    """An array of batch rows ``[B, ...]``: rows over the batch mesh axes where they divide ``B``
    (replicated where not, e.g. one prompt on data=2)."""
    return NamedSharding(mesh, logical_to_spec(("batch", *[None] * (len(shape) - 1)), shape, mesh, rules))


def device_mesh(sizes: dict, what: str = "--mesh") -> Mesh:
    """A (data, fsdp, tensor) mesh of these sizes over the first devices of this process (one axis
    may be -1: all the devices there are). For decoding and other one-process work; a clear
    ``ValueError`` when the process has too few devices."""
    devices = jax.devices()
    n = len(devices) if -1 in sizes.values() else math.prod(sizes.values())
    if n > len(devices) or len(devices) % max(n, 1) and -1 in sizes.values():
        form = ",".join(f"{k}={v}" for k, v in sizes.items())
        hint = (f" On a CPU, simulate devices: XLA_FLAGS=--xla_force_host_platform_device_count={n}."
                if jax.default_backend() == "cpu" else "")
        raise ValueError(f"{what} {form} needs {n} devices; this process has {len(devices)}"
                         f" ({jax.default_backend()}).{hint}")
    return make_mesh(sizes, devices[:n])
