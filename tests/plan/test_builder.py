"""The plan compiles what training runs: for configs/tiny.py on the 8-device CPU mesh, the
sampler, the old-policy logprob pass and the update that `daro_jax.plan` lowers on abstract
arguments (`train.jitted.longest_inputs`) lower to the same StableHLO text as the calls
training makes in its first step (the same jitted functions, on its real arrays)."""

from __future__ import annotations

import dataclasses
import difflib

from helpers import PatternPool, tiny_config

from daro_jax.algo import presets
from daro_jax.plan import programs
from daro_jax.train import loop


class Recorder:
    """A jitted function that keeps the arguments of its first call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)

    def lowered_text(self) -> str:
        args, kwargs = self.calls[0]
        return self.fn.lower(*args, **kwargs).as_text()


def first_difference(a: str, b: str) -> str:
    return "\n".join(list(difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm=""))[:12])


def test_the_plan_lowers_the_programs_training_runs():
    """Two minibatches a step (so an old-policy pass runs) and a KL term (a reference pass):
    program by program, the plan's lowering is training's, text for text."""
    config = tiny_config(**{"train.minibatches": 2, "algo.name": "grpo"})
    run = loop.build(config)
    p = run.programs
    assert p.passes == ("old_logp", "ref_logp")
    recorded = {
        "sampler": Recorder(p.sample.jitted),
        "logprob pass": Recorder(p.logprobs),
        "update": Recorder(p.update),
    }
    p.sample.jitted = recorded["sampler"]
    run.programs = dataclasses.replace(
        p, logprobs=recorded["logprob pass"], update=recorded["update"]
    )
    loop.run_step(run, 0, PatternPool(config.algo.k))
    p.sample.jitted = recorded["sampler"].fn  # samplers are cached: the plan gets this one
    assert [len(r.calls) for r in recorded.values()] == [1, 2, 2]

    spec = presets.resolve(config.algo, max_response_len=config.sampler.max_new_tokens)
    planned = programs.build(config, run.mesh, spec, prompt_len=p.sample.prompt_len)
    step = {s.name: s for s in programs.step_programs(config, planned, run.mesh)}
    assert list(step) == list(recorded)
    assert step["logprob pass"].runs == 2 and step["update"].runs == 2
    for name, recorder in recorded.items():
        ours, theirs = step[name].lower().as_text(), recorder.lowered_text()
        assert ours == theirs, f"{name}: the plan's lowering differs\n" + first_difference(
            theirs, ours
        )
