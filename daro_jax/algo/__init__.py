"""The algorithms: `presets` (GRPO, Dr. GRPO, LIPO, DAPO, DARO, GSPO, CISPO as settings of one
loss), `advantages` (rewards → advantages and pass-rate groups), `losses` (the unified
policy-gradient loss), `daro` (DARO's learnable group weights), `loss_sums` (the loss's metric
sums and means), `optim` (optax.multi_transform: model or adapters vs DARO weights)."""
