"""The algorithm presets and their validation (daro_jax/algo/presets.py)."""

import jax
import pytest
from algo_reference import K, T, algo_cfg, make_spec

from daro_jax.algo import presets


def test_presets_and_command_line_overrides():
    assert make_spec("grpo").clip_high == 0.2 and make_spec("grpo").kl_beta > 0
    assert make_spec("dapo").clip_high == 0.28 and make_spec("dapo").dynamic_sampling
    assert make_spec("daro").aggregation == "group_token_mean"
    assert make_spec("daro").kl_beta == 0.0 and make_spec("dapo").kl_beta == 0.0
    assert make_spec("dr_grpo").advantage == "group_mean"
    assert make_spec("lipo").advantage == "batch_std"
    assert make_spec("grpo", clip_high=0.3).clip_high == 0.3
    gspo, cispo = make_spec("gspo"), make_spec("cispo")
    assert (gspo.ratio_level, gspo.clip_low, gspo.clip_high) == ("sequence", 3e-4, 4e-4)
    assert (cispo.policy_loss, cispo.clip_low, cispo.clip_high) == ("cispo", 1.0, 0.28)
    assert make_spec("daro").uses_daro_weights and not make_spec("dapo").uses_daro_weights
    assert make_spec("cispo", daro_weights=True).uses_daro_weights
    spec = make_spec("daro")
    assert hash(spec) == hash(make_spec("daro"))
    assert jax.jit(lambda x, s: x * s.k, static_argnums=1)(1.0, spec) == K


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(k=1), "k"),
        (dict(name="ppo"), "name"),
        (dict(clip_low=0.3, clip_high=0.2), "clip_high"),
        (dict(clip_low=-0.1), "clip_low"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(kl_beta=-1.0), "kl_beta"),
        (dict(aggregation="mean"), "aggregation"),
        (dict(advantage="rloo"), "advantage"),
        (dict(daro_parameterization="softplus"), "daro_parameterization"),
        (dict(daro_log_weight_bounds=(1.0, 2.0)), "daro_log_weight_bounds"),
        (dict(name="dapo", overlong_cache=20), "overlong_cache"),
        (dict(name="dapo", overlong_penalty=-1.0), "overlong_penalty"),
        (dict(dynamic_sampling_max_tries=0), "dynamic_sampling_max_tries"),
        (dict(std_ddof=2), "std_ddof"),
        (dict(sampler_is_cap=0.5), "sampler_is_cap"),
        (dict(name="dapo", daro_learn_weights=False), "daro_learn_weights"),
        (dict(name="grpo", daro_log_term=False), "daro_log_term"),
        (dict(policy_loss="ppo"), "policy_loss"),
        (dict(ratio_level="group"), "ratio_level"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(kl_placement="advantage"), "kl_placement"),
        (dict(entropy_coef=-0.1), "entropy_coef"),
        (dict(name="cispo", dual_clip=3.0), "dual_clip"),
        (dict(name="cispo", clip_low=1.5), "clip_low"),
        (dict(daro_weights=False), "daro_weights"),
    ],
)
def test_bad_algo_config_raises(overrides, field):
    name = overrides.pop("name", "daro")
    with pytest.raises(ValueError, match=f"algo.{field}="):
        make_spec(name, **overrides)


def test_unknown_field_raises():
    cfg = dict(algo_cfg("daro").items(), clip=0.2)
    with pytest.raises(ValueError, match=r"unknown fields \['clip'\]"):
        presets.resolve(cfg, max_response_len=T)
