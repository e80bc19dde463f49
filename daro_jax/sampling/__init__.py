"""Sampling: `sampler` (the jitted K-rollout sampler: prefill once, one decode loop),
`selection` (temperature / top-p / top-k token selection), `completions` (host side:
sample and decode completions to text)."""
