"""DAPO's overlong reward shaping (Yu et al. 2025, "soft overlong punishment"), in the 0/1
reward scale of our verifier.

DAPO's outcome reward is R = +1 (right) or -1 (wrong), and its length penalty R_length(len)
in [-penalty, 0] (`overlong_penalty`) is added to it. Our rewards are r = (R + 1) / 2 in
{0, 1}; the same affine map takes DAPO's shaped reward R + R_length onto

    r' = (R + R_length + 1) / 2 = r + R_length / 2                     (`shape_rewards`)

so DAPO's penalty of up to 1 on a reward range of 2 is up to 1/2 on our range of 1. Advantages
normalised by the group's std (or centred only, up to the factor 2 of the range) are then
those of DAPO's convention: a right answer at the length limit (reward 1/2) ranks above its
group's wrong answers (0) instead of tying with them, and below the short right ones. It
does not always keep a positive advantage: with 6 short right answers, 1 right at the
limit and 1 wrong (K = 8, std ddof 1), its advantage is -0.84 (DAPO's own behaviour).
"""

DAPO_TO_OURS = 0.5  # our reward range (1) over DAPO's (2): r = (R + 1) / 2


def overlong_penalty(lengths, max_len: int, cache_len: int, penalty: float = 1.0):
    """DAPO's soft length penalty R_length, in DAPO's reward units (rewards -1 and +1):

        R(len) = 0                                              if len <= L_max - L_cache
               = penalty * (L_max - L_cache - len) / L_cache    if L_max - L_cache < len <= L_max
               = -penalty                                       if len > L_max

    i.e. -penalty * clip((len - (L_max - L_cache)) / L_cache, 0, 1). `lengths` is a NumPy or
    JAX array (the result has its type, float), so it can be used inside `jax.jit`.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(
            f"overlong shaping needs 0 < cache_len <= max_len, got cache_len={cache_len}, "
            f"max_len={max_len}; set the overlong cache length below the response length."
        )
    if penalty < 0:
        raise ValueError(f"overlong penalty={penalty} must be >= 0 (it is subtracted).")
    excess = (lengths - (max_len - cache_len)) / cache_len
    return -penalty * excess.clip(0.0, 1.0)


def shape_rewards(rewards, lengths, max_len: int, cache_len: int, penalty: float = 1.0):
    """0/1 rewards with DAPO's soft overlong punishment mapped onto them (module docstring):

        r' = r + R_length(len) / 2,   R_length = overlong_penalty(len, L_max, L_cache, penalty)

    `penalty` is DAPO's, in its ±1 units (1.0 in the DAPO paper)."""
    return rewards + DAPO_TO_OURS * overlong_penalty(lengths, max_len, cache_len, penalty)
