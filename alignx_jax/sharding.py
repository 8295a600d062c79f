"""Logical axis names -> mesh axes: meshes, NamedShardings, model placement, activation constraints.

Parameters and activations are annotated with *logical* axis names (`embed`, `mlp`,
`activation_batch`, ...). A rule table maps each logical name to zero or more of the mesh axes
`data`, `fsdp`, `tensor`, so one model definition runs on one CPU, a GPU box or a TPU pod.
Activation constraints (`constrain`) are no-ops unless a mesh is activated with `use_mesh`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignx_jax.errors import MeshError

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# The metadata key on every nnx.Param holding its logical axis names (one per dimension): flax's own, so
# flax tooling (nnx.get_partition_spec, nnx.logical_axis_rules, nnx.get_named_sharding) reads them too.
LOGICAL_AXES_KEY = "out_sharding"

Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    # parameters: FSDP shards the model dimension, tensor parallelism the wide ones
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # activations: batch over data+fsdp, width dims follow their weights
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
)


# every logical axis name a parameter or activation carries (the rules' names, and the preference head's
# own, which no default rule shards); `sharding.rules` may name only these
LOGICAL_AXES: tuple[str, ...] = (*(name for name, _ in DEFAULT_RULES), "pref_dims", "pref_classes")


def _rule_dict(rules: Rules | None) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for name, axes in DEFAULT_RULES if rules is None else rules:
        if name in out:  # first match wins, as in flax's logical rules
            continue
        out[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return out


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 meaning "all remaining devices"."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(data), int(fsdp), int(tensor)]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise MeshError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: sizes must be positive or -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise MeshError(
                f"mesh data={data} fsdp={fsdp} tensor={tensor}: {n} devices are not divisible by {known}"
            )
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise MeshError(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices, "
            f"but {n} are available"
        )
    try:  # topology-aware placement on real accelerators
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(tuple(sizes), devices=devices)
    except Exception:  # CPU / odd shapes: plain row-major order is fine
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh from a config section with `data`, `fsdp`, `tensor` entries."""
    get = mesh_cfg.get if hasattr(mesh_cfg, "get") else (lambda k, d=None: getattr(mesh_cfg, k, d))
    return make_mesh(get("data", 1), get("fsdp", 1), get("tensor", 1), devices=devices)


def logical_to_spec(
    axes: Sequence[str | None], mesh: Mesh, rules: Rules | None = None, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """PartitionSpec for logical `axes`; mesh axes that are size 1, reused, or do not divide the
    dimension (when `shape` is given) are dropped so that any model fits any mesh."""
    table = _rule_dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for i, name in enumerate(axes):
        chosen: list[str] = []
        size = 1
        for ax in table.get(name, ()) if name is not None else ():
            if ax not in mesh.shape or ax in used or mesh.shape[ax] == 1:
                continue
            if shape is not None and shape[i] % (size * mesh.shape[ax]):
                continue
            chosen.append(ax)
            size *= mesh.shape[ax]
        used.update(chosen)
        spec.append(None if not chosen else (chosen[0] if len(chosen) == 1 else tuple(chosen)))
    return PartitionSpec(*spec)


def logical_sharding(
    axes: Sequence[str | None], mesh: Mesh, rules: Rules | None = None, shape: Sequence[int] | None = None
) -> NamedSharding:
    """NamedSharding for an array whose dimensions have the logical names `axes`."""
    return NamedSharding(mesh, logical_to_spec(axes, mesh, rules, shape))


# ---- activation constraints -------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules | None] | None] = contextvars.ContextVar(
    "alignx_sharding_active", default=None
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | None = None) -> Iterator[Mesh]:
    """Activate `mesh` + `rules` for `constrain` (trace your jitted functions inside this block)."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    active = _ACTIVE.get()
    return None if active is None else active[0]


def target_platform() -> str:
    """The platform the code being traced will run on: the active `use_mesh` mesh's devices' (`alignx
    plan` traces for TPU topology devices from a CPU process), else JAX's default backend. Model code
    picks platform-specific paths (splash kernel, weight-gradient layout) by this, not the backend."""
    mesh = active_mesh()
    if mesh is not None:
        return str(mesh.devices.flat[0].platform)
    return jax.default_backend()


def active_spec(axes: Sequence[str | None], shape: Sequence[int]) -> tuple[Mesh, PartitionSpec] | None:
    """(mesh, PartitionSpec) of logical `axes` under the active `use_mesh` block; None without one."""
    active = _ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    return mesh, logical_to_spec(axes, mesh, rules, shape)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; identity when no mesh is active."""
    placed = active_spec(axes, x.shape)
    if placed is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(*placed))


# ---- model state --------------------------------------------------------------------------------


def annotated(cls: type[nnx.Variable], value: Any, axes: Sequence[str | None]) -> nnx.Variable:
    """A `cls` variable (nnx.Param, nnx.LoRAParam) carrying its logical axis names as flax metadata.

    Placed later by `shard_model`, not at creation: models are built before (or without) a mesh, so
    flax's eager sharding is off for it."""
    return cls(value, eager_sharding=False, **{LOGICAL_AXES_KEY: tuple(axes)})


def variable_axes(v: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names of an nnx Variable (None when it carries none)."""
    meta = v.get_metadata()
    axes = meta.get(LOGICAL_AXES_KEY)
    return None if axes is None else tuple(axes)


def model_shardings(model_or_state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """A tree like `nnx.state(model)` whose leaves are NamedShardings (works on abstract models
    from `nnx.eval_shape`). Variables without logical names are replicated."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)

    def one(v):
        if isinstance(v, nnx.Variable):
            axes = variable_axes(v)
            shape = tuple(v.get_value().shape)
            if axes is None or len(axes) != len(shape):
                return v.replace(NamedSharding(mesh, PartitionSpec()))
            return v.replace(logical_sharding(axes, mesh, rules, shape))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> nnx.Module:
    """Place every variable of `model` on its logical sharding (in place; returns the model)."""
    state = nnx.state(model)
    shardings = model_shardings(state, mesh, rules)
    nnx.update(model, jax.tree.map(_put, state, shardings))
    return model


def _put(x: Any, sharding: NamedSharding) -> Any:
    """`jax.device_put`, also for a PRNG key array on a mesh of several processes (device_put refuses
    those there): its key data is placed, then wrapped again."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        spec = PartitionSpec(*sharding.spec, *([None] * (jax.random.key_data(x).ndim - x.ndim)))
        data = jax.device_put(jax.random.key_data(x), NamedSharding(sharding.mesh, spec))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(x, sharding)
