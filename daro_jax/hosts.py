"""Arrays between the processes and the mesh: each process holds its own rows of a batch.

With P processes, a global batch of P·b rows is held as process p's rows [p·b, (p+1)·b)
on the host and as one row-sharded global array on the mesh (logical axis "batch"):

- `to_global(local, mesh)`: every process's rows → the global array;
- `local_rows(x)`: this process's rows of a global row-sharded array (its inverse);
- `to_host(x)`: the whole of a global array, on every host;
- `allgather(tree)`: NumPy trees of every process, concatenated in process order;
- `global_max(value)`: the largest of one integer per process.

`to_host`, `allgather` and `global_max` are collective with several processes: every
process calls them at the same point. On one process each is a copy to the host.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from daro_jax import sharding


def batch_sharding(mesh: Mesh, shape: tuple[int, ...], what: str = "batch") -> NamedSharding:
    """Rows over the mesh's batch axes, the other dimensions whole. Rows the batch axes do
    not divide are replicated (logged once, `sharding.logical_spec`)."""
    names = ("batch",) + (None,) * (len(shape) - 1)
    spec = sharding.logical_spec(names, shape, mesh, what=what, replicate_indivisible=True)
    return NamedSharding(mesh, spec)


def to_global(local: np.ndarray, mesh: Mesh, what: str = "batch") -> jax.Array:
    """The global array whose rows are every process's `local` rows, in process order."""
    local = np.asarray(local)
    shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding(mesh, shape, what), local, shape)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global row-sharded array (all of it on one process)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    shards = {s.index[0].start or 0: s for s in x.addressable_shards}
    rows = np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])
    if rows.shape[0] == x.shape[0]:  # replicated rows: take this process's slice
        n = x.shape[0] // jax.process_count()
        rows = rows[jax.process_index() * n : (jax.process_index() + 1) * n]
    return rows


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) global array on this host."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def allgather(tree):
    """Every process's `tree` (NumPy leaves with a leading row axis), concatenated along it
    in process order, on every process; `tree` itself on one process."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def global_max(value: int) -> int:
    """The largest `value` over the processes."""
    if jax.process_count() == 1:
        return int(value)
    return int(np.max(multihost_utils.process_allgather(np.int32(value))))
