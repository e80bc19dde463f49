"""The host's share of an RL step: measured CPU seconds per completion, not an estimate.

Per step each TPU host turns its share of the B·K completions into text, scores them with
the verifier pool and packs them for the logprob pass and the updates (`train.loop`:
`completions.decode`, `rewards.RewardPool.score`, `train.packing.pack_blocks`), while its
chips wait: training does not overlap this work with the device's. `bench.host_time`
measures it at a recipe's shapes (every completion max_new_tokens long, texts built from
the MATH-500 answers); MEASURED records its seconds per completion on this project's CPU
machine (2 cores shared with other jobs: an upper bound for a TPU host's many cores, which
run more verifier workers). `seconds` scales them to one host's share of a step.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class HostCosts:
    """Seconds per completion of max_new_tokens tokens, and where they were measured."""

    decode: float
    score: float
    pack: float
    tokens: int  # tokens per completion when measured
    where: str

    @property
    def per_completion(self) -> float:
        return self.decode + self.score + self.pack


# `nice -n 5 python -m bench.host_time` (configs/qwen2_5_math_1_5b.py: 1,024 completions of
# 3,072 tokens, 2 verifier workers), best of 2 rounds, nothing else running; bench/RESULTS.md
# has the run (the figures of 2026-12-07, taken at load 20.6, were 21x these).
MEASURED = HostCosts(
    decode=1.226e-3,
    score=2.527e-3,
    pack=0.096e-3,
    tokens=3072,
    where="2026-12-08, x86_64, 2 CPU cores, quiet (load 1.8), bench/host_time.py",
)


def hosts(family: str, n_chips: int) -> int:
    """TPU hosts of a slice: 4 chips each, but one host for a v5e or v6e slice of 8 chips or
    fewer (cloud.google.com/tpu/docs system architecture)."""
    if family in ("v5e", "v5litepod", "v6e") and n_chips <= 8:
        return 1
    return max(1, n_chips // 4)


def seconds(completions: int, tokens: int, family: str, n_chips: int) -> float:
    """One host's measured seconds for its share of a step's `completions` of `tokens`
    tokens each (per completion cost scaled by tokens / MEASURED.tokens)."""
    share = completions / hosts(family, n_chips)
    return share * MEASURED.per_completion * tokens / MEASURED.tokens


def where() -> str:
    """A label of the host figures: per completion, and where they were measured."""
    m = MEASURED
    return f"{m.per_completion * 1e3:.1f} ms per completion of {m.tokens} tokens, {m.where}"
