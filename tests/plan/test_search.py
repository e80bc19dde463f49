"""The mesh search (daro_jax/plan/search.py) on configs/tiny.py over a v5e 2×2: its
candidates split the batch, it ranks what fits with the best last, and it refuses in one
line when nothing fits."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import plan_tiny_config

from daro_jax import models, plan
from daro_jax.plan import chips, report, search


def tiny():
    return plan_tiny_config()


def test_candidates_divide_the_chips_and_the_model():
    """The recipe's own setting first; tensor divides tiny's 2 key/value heads; every mesh
    uses the 4 chips; block_rows doubled and halved and remat switched on the recipe's
    mesh."""
    config = tiny()
    cfg, _ = models.architecture(config.model)
    found = search.candidates(config, chips.tpu_devices("v5e:2x2"), cfg)
    own = search.Candidate((1, 4, 1), 2, False)  # smollm2_135m's block_rows 2, no remat
    assert found[0] == own
    meshes = {c.mesh for c in found}
    assert meshes == {(1, 4, 1), (2, 2, 1), (4, 1, 1), (1, 2, 2), (2, 1, 2)}
    assert all(d * f * t == 4 and cfg.num_kv_heads % t == 0 for d, f, t in meshes)
    assert dataclasses.replace(own, block_rows=4) in found
    assert dataclasses.replace(own, block_rows=1) in found
    assert dataclasses.replace(own, remat=True) in found
    assert len(found) == len(set(found))


def test_search_ranks_the_fitting_candidates_best_last(monkeypatch):
    """The recipe's own setting is compiled as `python -m daro_jax.plan` compiles the recipe
    (the same config but for the mesh's −1 resolved), and its estimate is that plan's."""
    config = tiny()
    made, make_plan = [], report.make_plan

    def recording(setting, *args, **kwargs):
        made.append((setting, make_plan(setting, *args, **kwargs)))
        return made[-1][1]

    monkeypatch.setattr(report, "make_plan", recording)
    among = [search.Candidate((1, 4, 1), 2, False), search.Candidate((2, 2, 1), 2, False)]
    ranked = search.search(config, among=among)
    assert [e.fits for e in ranked] == [True, True]
    assert ranked[0].step >= ranked[1].step > 0
    setting, own = made[0]
    resolved = config.to_dict() | {"mesh": config.mesh.to_dict() | {"shape": (1, 4, 1)}}
    assert setting.to_dict() == resolved and plan.make_plan is make_plan
    mine = next(e for e in ranked if e.candidate == among[0])
    assert mine.step == pytest.approx(sum(own.step_seconds().values()), rel=1e-6)
    assert mine.update_mfu == pytest.approx(own.update_mfu(), rel=1e-6)
    table = search.format_table(ranked, "v5e:2x2").splitlines()
    assert table[0].startswith("mesh search on v5e:2x2 (compiler estimates")
    assert table[-1].startswith("| " + "×".join(map(str, ranked[-1].candidate.mesh)) + " |")


def test_search_refuses_in_one_line_when_nothing_fits():
    """A micro-batch of 65536 packed rows a block: the update's logits need ~100 GiB a chip."""
    config = tiny()
    oversized = [search.Candidate((1, 4, 1), 65536, False)]
    with pytest.raises(ValueError) as refused:
        search.search(config, among=oversized)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("plan --search: none of the 1 candidates fits v5e:2x2 (least peak")
    assert "block_rows 65536" in message
