"""`RewardPool`: scores completions in worker processes that are killed and replaced when an
item passes its deadline or a worker dies, so one bad answer costs at most the timeout.

Workers start with the "forkserver" method by default (the server is a fresh interpreter
that imports this module once; workers fork from it, never from the trainer process, which
has JAX and its threads loaded) or "spawn". Each worker caps its address space with
RLIMIT_AS at its start-up size plus `memory_limit_mb`, ignores SIGINT (the parent owns
shutdown), and scores chunks of items grouped by gold (so its gold and verdict caches hit),
sending back one (index, reward, reason) per item. The
parent keeps a per-worker deadline of timeout_s + 0.5 s from the last result; a worker past
it is killed (SIGKILL), its current item scores 0 ("timeouts"; "crashes" if the worker
died), the rest of its chunk is re-queued and a new worker takes its place. Inside the
worker the same timeout is enforced first with SIGALRM; a worker whose item was interrupted
that way (or by a MemoryError) answers 0 ("timeouts" / "memory_errors") and exits, and is
replaced the same way. A worker that is not ready 60 s after its start is replaced too;
three failed starts in a row raise.

As with any "spawn"/"forkserver" pool, workers re-import the parent's main module: start
work in a script under `if __name__ == "__main__":`.
"""

import collections
import contextlib
import dataclasses
import logging
import math
import multiprocessing
import resource
import signal
import time
import weakref
from multiprocessing.connection import wait

import numpy as np

from daro_jax.rewards.verify import REASONS, VerifierConfig, score_item

_KILL_GRACE_S = 0.5
_START_TIMEOUT_S = 60.0
_MAX_START_FAILURES = 3
_RETIRE_REASONS = ("timeouts", "memory_errors")
_COUNTERS = ("items", *REASONS, "worker_restarts")


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmSize missing from /proc/self/status")


def _worker_main(conn, memory_limit_mb: int) -> None:
    """Worker loop: receive (VerifierConfig, chunk [(index, completion, gold)]), send
    (index, reward, reason) per item; None ends the loop. Sends None once ready. Exits
    after an item interrupted by its deadline or by the memory limit (the libraries' state
    is not trusted after an asynchronous interruption); the parent then starts a fresh
    worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    limit = _vm_size_bytes() + memory_limit_mb * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    conn.send(None)
    while True:
        message = conn.recv()
        if message is None:
            return
        config, chunk = message
        for index, completion, gold in chunk:
            reward, reason = score_item(completion, gold, config)
            conn.send((index, reward, reason))
            if reason in _RETIRE_REASONS:
                return


class _Worker:
    """Parent-side handle: process, pipe, items sent and not yet answered, deadline (start-up
    deadline until ready; while items are pending, timeout + grace from the last result)."""

    def __init__(self, process, conn):
        self.process = process
        self.conn = conn
        self.pending = collections.deque()
        self.ready = False
        self.retiring = False
        self.deadline = time.monotonic() + _START_TIMEOUT_S


def _shutdown(workers: list) -> None:
    for worker in workers:
        with contextlib.suppress(OSError):
            worker.conn.send(None)
    for worker in workers:
        worker.process.join(timeout=1.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()


class RewardPool:
    """Process pool of math verifiers.

        with RewardPool(num_workers=2, timeout_s=2.0, fallback="none") as pool:
            rewards = pool.score(completions, golds)   # np.float32 [N] in {0, 1}
            counters = pool.pop_stats()                # counts since the last pop

    Keyword options are those of `VerifierConfig` (fallback, max_chars, max_answer_chars,
    max_digits), the worker's address-space headroom `memory_limit_mb`, the number of items
    sent to a worker at once (`chunk_size`) and `start_method`. `score(..., fallback=...)`
    extracts answers with another fallback for that call only.

    Counters ("items" and one per reason of `verify.REASONS`: correct, wrong, no_answer,
    too_long, prescreened, parse_failures, gold_failures, timeouts, memory_errors, errors,
    crashes; plus worker_restarts) are accumulated over `score` calls; `stats` reads them,
    `pop_stats` reads and resets them. Scores are identical to `math_reward` item by item
    (same `score_item`, same config) except for items that time out in one and not the other.
    """

    def __init__(
        self,
        num_workers: int,
        timeout_s: float,
        *,
        fallback: str = "none",
        memory_limit_mb: int = 1024,
        max_chars: int = 4000,
        max_answer_chars: int = 1000,
        max_digits: float = 100_000.0,
        chunk_size: int = 16,
        start_method: str = "forkserver",
    ):
        if num_workers < 1:
            raise ValueError(f"RewardPool num_workers={num_workers} must be >= 1.")
        if memory_limit_mb < 64:
            raise ValueError(f"RewardPool memory_limit_mb={memory_limit_mb} must be >= 64.")
        if chunk_size < 1:
            raise ValueError(f"RewardPool chunk_size={chunk_size} must be >= 1.")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(
                f"RewardPool start_method={start_method!r}: use 'forkserver' or 'spawn' "
                "(fork would copy the trainer's JAX threads into the workers)."
            )
        self._config = VerifierConfig(
            fallback=fallback,
            timeout_s=timeout_s,
            max_chars=max_chars,
            max_answer_chars=max_answer_chars,
            max_digits=max_digits,
        )
        self._call_config = self._config  # the settings of the `score` call in progress
        self._memory_limit_mb = memory_limit_mb
        self._chunk_size = chunk_size
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._context.set_forkserver_preload([__name__])
        self._stats = dict.fromkeys(_COUNTERS, 0)
        self._start_failures = 0
        self._workers = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        for _ in range(num_workers):
            self._workers.append(self._start_worker())

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(child_conn, self._memory_limit_mb),
            daemon=True,
            name="reward-worker",
        )
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (they change when a worker is replaced)."""
        return [worker.process.pid for worker in self._workers]

    @property
    def stats(self) -> dict[str, int]:
        """Counters accumulated since the last `pop_stats` (a copy)."""
        return dict(self._stats)

    def pop_stats(self) -> dict[str, int]:
        """Counters since the last call, then reset to zero."""
        stats = self._stats
        self._stats = dict.fromkeys(_COUNTERS, 0)
        return stats

    def score(
        self, completions: list[str], golds: list[str], *, fallback: str | None = None
    ) -> np.ndarray:
        """Rewards (float32, 1.0 or 0.0) of completions[i] against golds[i]; `fallback`
        replaces the pool's answer extraction for this call (training and evaluation share
        one pool and extract differently)."""
        if not self._finalizer.alive:
            raise RuntimeError("RewardPool.score called after close().")
        if len(completions) != len(golds):
            raise ValueError(
                f"RewardPool.score: {len(completions)} completions but {len(golds)} golds; "
                "pass one gold per completion (repeat a prompt's gold for each rollout)."
            )
        for slot, worker in enumerate(self._workers):
            if worker.pending:  # left by an interrupted call: its answers must not land here
                self._replace(slot, None, np.zeros(0), collections.deque())
        config = self._config
        self._call_config = (
            config if fallback is None else dataclasses.replace(config, fallback=fallback)
        )
        n = len(completions)
        rewards = np.zeros(n, dtype=np.float32)
        cap = self._config.max_chars
        by_gold = {}
        for i, gold in enumerate(golds):
            by_gold.setdefault(gold, []).append(i)
        items = [(i, completions[i][-cap:], golds[i]) for group in by_gold.values() for i in group]
        size = max(1, min(self._chunk_size, math.ceil(n / (2 * len(self._workers)))))
        todo = collections.deque(items[i : i + size] for i in range(0, n, size))
        remaining = n
        while remaining:
            for worker in self._workers:
                if worker.ready and not worker.pending and todo:
                    self._send(worker, todo.popleft())
            timeout = min(w.deadline for w in self._workers) - time.monotonic()
            wait([w.conn for w in self._workers], None if math.isinf(timeout) else max(0, timeout))
            for slot in range(len(self._workers)):
                remaining -= self._check(slot, rewards, todo)
        self._stats["items"] += n
        return rewards

    def _send(self, worker: _Worker, chunk: list) -> None:
        worker.pending.extend(chunk)
        worker.deadline = time.monotonic() + self._config.timeout_s + _KILL_GRACE_S
        worker.conn.send((self._call_config, chunk))

    def _check(self, slot: int, rewards: np.ndarray, todo) -> int:
        """Read what the worker in `slot` sent; replace it if it retired, died or is past its
        deadline. Returns the number of items scored."""
        worker = self._workers[slot]
        try:
            done = self._receive(worker, rewards)
        except (EOFError, OSError):
            return self._replace(slot, None if worker.retiring else "crashes", rewards, todo)
        if worker.retiring:
            return done + self._replace(slot, None, rewards, todo)
        if time.monotonic() > worker.deadline:
            reason = "timeouts" if worker.ready else None
            return done + self._replace(slot, reason, rewards, todo)
        return done

    def _receive(self, worker: _Worker, rewards: np.ndarray) -> int:
        """Read the messages waiting from `worker`; returns the number of items scored."""
        done = 0
        while not worker.retiring and worker.conn.poll():
            message = worker.conn.recv()
            if message is None:
                worker.ready = True
                worker.deadline = math.inf
                self._start_failures = 0
                continue
            index, reward, reason = message
            worker.pending.popleft()
            rewards[index] = reward
            self._stats[reason] += 1
            done += 1
            worker.retiring = reason in _RETIRE_REASONS
            worker.deadline = (
                time.monotonic() + self._config.timeout_s + _KILL_GRACE_S
                if worker.pending
                else math.inf
            )
        return done

    def _replace(self, slot: int, reason: str | None, rewards: np.ndarray, todo) -> int:
        """Kill the worker in `slot` and start a new one; score its current item 0 for
        `reason` (None: charge no item) and re-queue the rest of its chunk. Returns the
        number of items scored (0 or 1)."""
        worker = self._workers[slot]
        worker.process.kill()
        worker.process.join()
        worker.conn.close()
        if not worker.ready:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:
                raise RuntimeError(
                    f"reward workers failed {self._start_failures} times during start-up (last "
                    f"exit code {worker.process.exitcode}); check that the main script starts "
                    "work under `if __name__ == '__main__':` (workers re-import it), that "
                    "math-verify imports, and memory_limit_mb."
                )
        self._workers[slot] = self._start_worker()
        self._stats["worker_restarts"] += 1
        charged = 0
        if reason is not None and worker.pending:
            index = worker.pending.popleft()[0]
            rewards[index] = 0.0
            self._stats[reason] += 1
            charged = 1
        if worker.pending:
            todo.appendleft(list(worker.pending))
        return charged

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._finalizer()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
