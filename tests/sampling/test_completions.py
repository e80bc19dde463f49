"""completions: sample-then-decode against a greedy loop over the full forward
(`models.logits`) and the tokenizer's own decode; per-process rows equal every row on one
process; decode stops at each row's length and drops special tokens."""

import jax
import numpy as np

from daro_jax import models, sharding
from daro_jax.sampling import completions, sampler


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after `ids`, one full forward per token (no cache, no sampler)."""
    out = list(ids)
    for _ in range(n):
        logits = models.logits(model, np.asarray([out]), np.ones((1, len(out)), np.int32))
        out.append(int(np.argmax(np.asarray(logits)[0, -1])))
    return out[len(ids) :]


def test_greedy_completions_match_a_full_forward_loop(tiny_hf_dirs):
    mesh = sharding.make_mesh((1, -1, 1))
    model = models.load(tiny_hf_dirs["llama31"], mesh=mesh)
    tok = model.tokenizer
    prompt_ids = [tok(text)["input_ids"] for text in ("2 + 3 =", "x", "7 * 6 =")]
    prompt_ids.append(prompt_ids[0])  # 4 prompts: whole rows on the 8 devices' shards
    n = 5
    sample = sampler.make_sampler(
        model.config, k=2, max_new_tokens=n, prompt_len=16, temperature=0.0, mesh=mesh
    )
    prompts = completions.left_pad(prompt_ids, 16)
    out = completions.sample_and_decode(
        sample, model.params, *prompts, jax.random.key(0), tok, per_process=False
    )
    want = [greedy_reference(model, ids, n) for ids in prompt_ids for _ in range(2)]
    np.testing.assert_array_equal(out["tokens"], np.asarray(want))
    np.testing.assert_array_equal(out["lengths"], np.full(8, n))
    assert out["texts"] == [tok.decode(w, skip_special_tokens=True) for w in want]
    mine = completions.sample_and_decode(
        sample, model.params, *prompts, jax.random.key(0), tok, per_process=True
    )
    assert mine["texts"] == out["texts"]
    for name in ("tokens", "mask", "logprobs", "lengths", "truncated"):
        np.testing.assert_array_equal(mine[name], out[name])


def test_decode_stops_at_the_length_and_drops_special_tokens(tiny_hf_dirs):
    tok = models.load(tiny_hf_dirs["llama31"]).tokenizer
    hello, bye = tok("hello")["input_ids"], tok("bye!")["input_ids"]
    eos = tok.eos_token_id
    tokens = np.zeros((3, 8), np.int32)
    tokens[0, : len(hello) + 1] = [*hello, eos]
    tokens[1, : len(bye)] = bye
    tokens[2, :2] = bye[:2]
    lengths = np.array([len(hello) + 1, len(bye) - 1, 0])
    assert completions.decode(tok, tokens, lengths) == [
        tok.decode(hello),
        tok.decode(bye[:-1]),
        "",
    ]
