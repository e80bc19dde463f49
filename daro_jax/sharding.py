"""Device mesh and logical-axis sharding.

Arrays carry logical axis names (batch, embed, heads, …); one small rules table maps each
name to a mesh axis (or a tuple of them, or None = replicated). A dimension whose size the
mesh axes do not divide is replicated instead (e.g. SmolLM2's 9 heads on tensor=2), and a
mesh axis is used at most once per array.

Mesh axes: ("data", "fsdp", "tensor"). Batch is split over data × fsdp; weights are split
over fsdp (ZeRO-3 style) on their embed dimension and over tensor on heads / mlp / vocab.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "daro_jax_mesh", default=None
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one entry may be −1 for "all remaining devices"."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape={tuple(shape)} must have 3 entries for {MESH_AXES}.")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape={tuple(shape)}: sizes must be ≥ 1, with at most one −1.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(
                f"mesh.shape={tuple(shape)}: {len(devices)} devices are not divisible by {known}."
            )
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh.shape={tuple(shape)} needs {math.prod(shape)} devices but "
            f"{len(devices)} are available; use -1 for one axis to take the rest."
        )
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def validate_rules(rules: Rules, mesh: Mesh) -> None:
    """Every rule must name known mesh axes."""
    for name, target in rules:
        targets = () if target is None else (target,) if isinstance(target, str) else target
        for axis in targets:
            if axis not in mesh.axis_names:
                raise ValueError(
                    f"sharding rule {name!r} → {target!r} names mesh axis {axis!r}; "
                    f"the mesh has {mesh.axis_names}."
                )


def logical_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions are called `names`."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; add it to the rules.")
        target = None if name is None else table[name]
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes):
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for a pytree given its logical names and shapes (same structure)."""
    validate_rules(rules, mesh)
    return jax.tree.map(
        lambda names, shape: NamedSharding(mesh, logical_spec(names, shape, mesh, rules)),
        axes_tree,
        shapes_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Within this context, traced `constrain` calls pin activations to the mesh."""
    validate_rules(rules, mesh)
    token = _ACTIVE.set((mesh, rules))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; the identity outside `use_mesh`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_spec(names, x.shape, mesh, rules))
    )


def update_blocks(train, mesh: Mesh) -> tuple[int, int]:
    """(G, R) of the packed update (`daro_jax.packing`): `train.prompt_blocks` blocks of a
    minibatch's prompts (0: gcd(prompts per minibatch, data × fsdp shards), one block per
    shard when they divide) and R = `train.block_rows` packed rows per block in each
    micro-batch."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    blocks = train.prompt_blocks or math.gcd(train.batch_prompts // train.minibatches, shards)
    return blocks, train.block_rows
