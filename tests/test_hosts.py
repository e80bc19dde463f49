"""hosts: global arrays from process rows and back, on one process (8 devices) and on two
(gloo, 4 devices each), checked against the NumPy concatenation of the processes' rows."""

import json
import sys

import jax
import numpy as np
from helpers import run_processes
from jax.sharding import PartitionSpec as P

from daro_jax import hosts, sharding


def _rows(process: int, n: int) -> np.ndarray:
    """Process `process`'s n rows: row values that name their process and position."""
    return (100 * process + np.arange(n * 3, dtype=np.int32)).reshape(n, 3)


def test_one_process_round_trip_and_replicated_rows(caplog):
    mesh = sharding.make_mesh((1, -1, 1))
    local = _rows(0, 8)
    x = hosts.to_global(local, mesh)
    assert x.shape == (8, 3) and x.sharding.spec == P(("data", "fsdp"), None)
    assert sorted(s.index[0].start for s in x.addressable_shards) == list(range(8))  # a row each
    np.testing.assert_array_equal(hosts.local_rows(x), local)
    np.testing.assert_array_equal(hosts.to_host(x), local)
    # 4 rows on 8 batch shards: replicated, and said so once.
    with caplog.at_level("WARNING"):
        y = hosts.to_global(_rows(0, 4), mesh, "four rows")
    assert y.sharding.spec == P(None, None)
    assert any("four rows" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(hosts.local_rows(y), _rows(0, 4))
    tree = {"a": local, "b": np.ones(8)}
    assert hosts.allgather(tree) is tree
    assert hosts.global_max(7) == 7


def _worker(process_id: int, num_processes: int, port: str) -> None:
    """One of 2 processes: each supplies its own rows; prints what it got back."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"localhost:{port}", num_processes=num_processes, process_id=process_id
    )
    mesh = sharding.make_mesh((1, -1, 1))
    local = _rows(process_id, 4)
    x = hosts.to_global(local, mesh)
    gathered = hosts.allgather({"rows": local})["rows"]
    out = {
        "shape": list(x.shape),
        "local_rows_equal": bool(np.array_equal(hosts.local_rows(x), local)),
        "to_host": hosts.to_host(x).tolist(),
        "allgather": gathered.tolist(),
        "max": hosts.global_max(3 + 5 * process_id),
    }
    print(json.dumps(out))


def test_two_processes_hold_their_own_rows():
    whole = np.concatenate([_rows(0, 4), _rows(1, 4)]).tolist()
    for got in run_processes(__file__, 2, 4, timeout=120):
        assert got == {
            "shape": [8, 3],
            "local_rows_equal": True,
            "to_host": whole,
            "allgather": whole,
            "max": 8,
        }


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
