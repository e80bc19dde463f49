"""Training: `loop` (the RL loop, `train()` top to bottom in the order of the work), `checks`
(the config checks run before anything loads), `state` (the train state, its shardings,
optimizer and restore), `update` (the jitted update and logprob passes, and their inputs)."""
