"""DAPO's overlong reward shaping (Yu et al. 2025, "soft overlong punishment")."""


def overlong_penalty(lengths, max_len: int, cache_len: int, penalty: float = 1.0):
    """Soft length penalty added to the rewards of responses near or past `max_len` tokens:

        R(len) = 0                                   if len <= L_max - L_cache
               = penalty * (L_max - L_cache - len) / L_cache   if L_max - L_cache < len <= L_max
               = -penalty                            if len > L_max

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
