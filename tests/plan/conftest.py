"""What the plan tests share: each test module runs in a process set up as `python -m
daro_jax.plan`'s (`plan.compile_only`), and that setup's environment variables are taken
back after the module, so no other test (or a process it starts) sees them; the plan of
configs/tiny.py on a v5e 2×2, made once a session."""

import contextlib
import os

import pytest
from helpers import plan_tiny_config

from daro_jax import plan


@contextlib.contextmanager
def compile_only():
    """`plan.compile_only` (libtpu quiet, and loadable by the CLI runs and other workers)
    inside the block; the environment as it was after it."""
    before = dict(os.environ)
    plan.compile_only(plan_tiny_config().tpu.accelerator)
    try:
        yield
    finally:
        for name in set(os.environ) - set(before):
            del os.environ[name]
        os.environ.update(before)


@pytest.fixture(scope="module", autouse=True)
def plan_process():
    with compile_only():
        yield


@pytest.fixture(scope="session")
def tiny():
    """configs/tiny.py and its plan on a v5e 2×2 (the sampler and the update: on-policy,
    no KL, so no logprob pass)."""
    config = plan_tiny_config()
    with compile_only():
        return config, plan.make_plan(config, title="configs/tiny.py")
