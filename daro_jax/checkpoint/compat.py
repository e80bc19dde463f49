"""Whether a run may resume from a checkpoint: the config fields that must not change
(`check_compatible`) and, with LoRA, the base the adapters were trained on (`check_base`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from daro_jax.errors import UserError

# Config fields that must not change when a run resumes from its checkpoint.
# algo.daro_parameterization: the stored DARO parameters are w or ln w.
COMPAT_KEYS = (
    "model.path",
    "model.lora.rank",
    "model.lora.alpha",
    "model.lora.targets",
    "algo.name",
    "algo.k",
    "algo.daro_parameterization",
    "train.batch_prompts",
    "data.source",
)

_ABSENT = "<absent>"
# The value of a compat field absent from a checkpoint's config (written before it existed):
# its default in configs/base.py.
COMPAT_DEFAULTS = {
    "model.lora.rank": 0,
    "model.lora.alpha": 16.0,
    "model.lora.targets": "q,k,v,o,gate,up,down",
}


class IncompatibleCheckpointError(UserError):
    """The checkpoint was written by a run whose config differs in a field that matters."""


def _as_dict(config: Mapping[str, Any] | str) -> dict:
    """A config as plain JSON data (tuples become lists), from a dict, ConfigDict or JSON str."""
    if isinstance(config, str):
        return json.loads(config)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=str))


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def check_compatible(
    saved_config: Mapping[str, Any] | str,
    current_config: Mapping[str, Any] | str,
    keys: Sequence[str] = COMPAT_KEYS,
) -> None:
    """Raises IncompatibleCheckpointError naming each dotted key whose value differs.

    Configs are nested dicts, ConfigDicts or their JSON strings; keys are dotted paths
    ("algo.k"). Other fields (learning rate, steps, logging) may change on resume, and
    model.lora.alpha/targets when neither run has adapters (rank 0).
    """
    saved, current = _as_dict(saved_config), _as_dict(current_config)

    def value(config, key):
        found = _lookup(config, key)
        return COMPAT_DEFAULTS.get(key, found) if found == _ABSENT else found

    # Without adapters on either side (rank 0), their other settings do not matter.
    no_lora = value(saved, "model.lora.rank") == value(current, "model.lora.rank") == 0
    diffs = [
        f"{key}: checkpoint {value(saved, key)!r}, this run {value(current, key)!r}"
        for key in keys
        if value(saved, key) != value(current, key)
        and not (no_lora and key.startswith("model.lora."))
    ]
    if diffs:
        raise IncompatibleCheckpointError(
            "The checkpoint in --workdir was written by a run with a different config:\n  "
            + "\n  ".join(diffs)
            + "\nSet these fields back to the checkpoint's values to resume, "
            "or pass a fresh --workdir to start a new run."
        )


def check_base(meta: Mapping[str, Any], base: Mapping[str, str]) -> None:
    """Raises IncompatibleCheckpointError when a LoRA checkpoint's adapters were trained on
    another base than this run's: meta["base"] and `base` are {"path", "digest"} (the base's
    model.path and `models.lora.base_digest`)."""
    saved = meta.get("base")
    if saved is None or saved["digest"] == base["digest"]:
        return
    raise IncompatibleCheckpointError(
        f"The checkpoint's LoRA adapters were trained on the base {saved['path']} (digest "
        f"{saved['digest'][:12]}), but this run's base {base['path']} has different weights "
        f"(digest {base['digest'][:12]}); load the base the adapters were trained on, or pass "
        "a fresh --workdir."
    )
