"""Device mesh and logical-axis sharding, through Flax's partitioning API.

Arrays carry logical axis names (batch, embed, heads, …): model parameters by
`nn.with_logical_partitioning`, activations by `constrain` (`nn.with_logical_constraint`).
`RULES` maps each name to a mesh axis (or a tuple of them, or None = replicated); Flax
applies the rules in their order, a mesh axis at most once per array.

Indivisible dimensions: an array placed on the mesh (params by `tree_shardings`, inputs by
`logical_spec`) whose dimension its mesh axes do not divide is an error naming the array,
the dimension and the axes, unless the caller opts in to replicating that dimension
(logged once). An activation constrained inside jit (`constrain`) is not checked: an
indivisible dimension is split unevenly, XLA padding the last shards (e.g. the sampler's
rows when B·K is not a multiple of the row shards, which replicating would instead put on
every device).

Mesh axes: ("data", "fsdp", "tensor"). Batch is split over data × fsdp; weights are split
over fsdp (ZeRO-3 style) on their embed dimension and over tensor on heads / mlp / vocab.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from daro_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("cache_length", None),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
)

_REPLICATED: set[str] = set()  # indivisible dimensions already logged
_ACTIVE: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("daro_jax_mesh", default=None)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one entry may be −1 for "all remaining devices"."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise UserError(f"mesh.shape={tuple(shape)} must have 3 entries for {MESH_AXES}.")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise UserError(f"mesh.shape={tuple(shape)}: sizes must be ≥ 1, with at most one −1.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise UserError(
                f"mesh.shape={tuple(shape)}: {len(devices)} devices are not divisible by {known}."
            )
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise UserError(
            f"mesh.shape={tuple(shape)} needs {math.prod(shape)} devices but "
            f"{len(devices)} are available; use -1 for one axis to take the rest."
        )
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def validate_rules(rules: Rules, mesh) -> None:
    """Every rule must name known mesh axes."""
    for name, target in rules:
        for axis in _axes(target):
            if axis not in mesh.axis_names:
                raise UserError(
                    f"sharding rule {name!r} → {target!r} names mesh axis {axis!r}; "
                    f"the mesh has {mesh.axis_names}."
                )


def _axes(target) -> tuple[str, ...]:
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def _checked(
    spec: PartitionSpec,
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh,
    what: str,
    replicate_indivisible: bool,
) -> PartitionSpec:
    """`spec` (Flax's mapping of `names`) after the divisibility check of every dimension."""
    out = []
    for dim, (name, size, target) in enumerate(zip(names, shape, spec, strict=True)):
        parts = math.prod(mesh.shape[a] for a in _axes(target))
        if size % parts:
            message = (
                f"{what}: dimension {dim} ({name!r}, size {size}) is not divisible by mesh "
                f"axes {_axes(target)} of {parts} devices"
            )
            if not replicate_indivisible:
                raise UserError(
                    f"{message}; choose a mesh whose axes divide it, or map {name!r} to None "
                    "in the sharding rules."
                )
            if message not in _REPLICATED:  # once per array and dimension
                _REPLICATED.add(message)
                logging.warning("%s; replicated on those axes.", message)
            target = None
        out.append(target)
    return PartitionSpec(*out)


def _check_known(names: Sequence[str | None], rules: Rules) -> None:
    known = {name for name, _ in rules}
    for name in names:
        if name is not None and name not in known:
            raise UserError(f"logical axis {name!r} has no sharding rule; add it to the rules.")


def logical_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh,
    rules: Rules = RULES,
    *,
    what: str = "array",
    replicate_indivisible: bool = False,
) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dimensions are called `names`
    (`nn.logical_to_mesh_axes` over `rules`). An indivisible dimension raises a ValueError
    naming `what`, or is replicated (logged) with `replicate_indivisible`."""
    _check_known(names, rules)
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    return _checked(spec, names, shape, mesh, what, replicate_indivisible)


def tree_shardings(logical_specs, shapes, mesh, rules: Rules = RULES):
    """NamedShardings of a pytree from its logical PartitionSpecs (`nn.get_partition_spec`
    of boxed params) and its shapes (same structure): `nn.logical_to_mesh_sharding`, then
    the divisibility check of every leaf (an error names the leaf's path)."""
    validate_rules(rules, mesh)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    mapped = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)

    def check(path, names, shape, named):
        names = tuple(names)
        _check_known(names, rules)
        what = "/".join(str(getattr(k, "key", k)) for k in path)
        spec = tuple(named.spec) + (None,) * (len(names) - len(named.spec))
        return NamedSharding(mesh, _checked(spec, names, shape, mesh, what, False))

    return jax.tree_util.tree_map_with_path(check, logical_specs, shapes, mapped, is_leaf=is_spec)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Rules = RULES):
    """Within this context, `constrain` (traced inside jit) pins activations to `mesh`;
    mesh None: no constraint (one device)."""
    if mesh is None:
        yield None
        return
    validate_rules(rules, mesh)
    token = _ACTIVE.set(mesh)
    try:
        with nn.logical_axis_rules(rules):
            yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `use_mesh`, or None outside one."""
    return _ACTIVE.get()


def on_mesh(fn: Callable, mesh: Mesh | None) -> Callable:
    """`fn` run (traced, inside jit) under `use_mesh(mesh)`, so its activation constraints
    apply: the one wrapper the jitted programs (update, sampler, logits) are made with."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with use_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`nn.with_logical_constraint` of `x` to the mesh of `use_mesh`; identity outside it.
    No divisibility check: a dimension its mesh axes do not divide is split unevenly, XLA
    padding the last shards (module docstring), never an error nor a replication."""
    mesh = _ACTIVE.get()
    if mesh is None:
        return x
    return nn.with_logical_constraint(x, tuple(names), mesh=mesh)


def batch_shards(mesh: Mesh) -> int:
    """How many parts the logical "batch" axis is split into: data × fsdp."""
    return math.prod(mesh.shape[axis] for axis in dict(RULES)["batch"])


def prompt_blocks(prompts: int, requested: int, mesh: Mesh) -> int:
    """G, the blocks a minibatch's `prompts` are forwarded in by the packed update
    (`daro_jax.train.packing`): `requested` (train.prompt_blocks), or for 0 gcd(prompts,
    `batch_shards`), one block per shard when they divide."""
    return requested or math.gcd(prompts, batch_shards(mesh))
