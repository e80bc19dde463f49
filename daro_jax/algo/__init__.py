"""The algorithms: `presets` (GRPO, Dr. GRPO, LIPO, DAPO, DARO as settings of one loss),
`advantages` (rewards → advantages and pass-rate groups), `losses` (the unified clipped
surrogate and DARO's group weights), `optim` (optax.multi_transform: model vs DARO weights)."""
