"""train.checks: a config that cannot run fails before the model loads, with a message that
names the field (and the value that would fix it)."""

from __future__ import annotations

import re

import pytest
from helpers import tiny_config

from daro_jax import sharding
from daro_jax.train import checks, loop


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: every error below must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was refused")

    monkeypatch.setattr(loop.models, "from_config", refuse)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train.batch_prompts": 3, "algo.k": 4}, "divisible by the 8 data shards"),
        ({"data.source": "/nonexistent/train.jsonl"}, "/nonexistent/train.jsonl"),
        ({"train.minibatches": 3}, "train.minibatches=3"),
        ({"train.prompt_blocks": 3}, "train.prompt_blocks=3 must divide the 4 prompts"),
        ({"train.block_rows": 0}, "train.block_rows=0"),
        ({"train.ppo_epochs": 0}, "train.ppo_epochs"),
        ({"sampler.temperature": 0.0}, "sampler.temperature=0.0"),
        ({"algo.name": "ppo"}, "config.algo.name='ppo'"),
        ({"algo.name": "dapo", "algo.dynamic_sampling_max_tries": 0}, "dynamic_sampling_max_tries"),
        ({"mesh.shape": (3, -1, 1)}, "mesh.shape=(3, -1, 1)"),
    ],
)
def test_bad_inputs_fail_before_the_model_loads(changes, message, no_model):
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        loop.build(tiny_config(**changes))


def test_several_processes_need_whole_shards_each():
    """On 8 data shards, 4 prompts of K = 4 fill the shards for one process; with 2
    processes each would hold 2 prompts, replicated over the shards: refused. 8 and 16
    prompts per 2 processes pass."""
    mesh = sharding.make_mesh((1, -1, 1))
    checks.check_config(tiny_config(**{"train.batch_prompts": 4}), mesh, processes=1)
    with pytest.raises(ValueError, match="with 2 processes, the 4 prompts of a minibatch"):
        checks.check_config(tiny_config(**{"train.batch_prompts": 4}), mesh, processes=2)
    with pytest.raises(ValueError, match=r"divisible by the number of processes \(2\)"):
        checks.check_config(tiny_config(**{"train.batch_prompts": 3}), mesh, processes=2)
    for prompts in (8, 16):
        checks.check_config(tiny_config(**{"train.batch_prompts": prompts}), mesh, processes=2)
