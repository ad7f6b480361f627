"""continue_from(): TOPD continuations from the prefixes (x, y_<t) of whole rollouts."""

import jax
import numpy as np
import pytest

from tests._hf_tiny import jitted_forward, random_model
from topd_jax.models import ModelConfig
from topd_jax.rollout import branch_points, continue_from, generate

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=48, rope_theta=1e4, tie_word_embeddings=False)
PROMPT_LENGTHS, P, N, K = [6, 3, 1], 6, 10, 7
# per row: two branch columns (a prompt column, completion columns, the very end L = P + N)
BRANCH_AT = np.array([[4, 11], [8, 16], [15, 6]])


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=1, scale=0.3)  # scale 0.3: peaked enough for varied samples


@pytest.fixture(scope="module")
def rollouts(model):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, (3, P)).astype(np.int32)
    mask = np.arange(P)[None, :] >= P - np.array(PROMPT_LENGTHS)[:, None]
    return generate(model, ids, mask, key=jax.random.key(3), max_new_tokens=N, return_cache=True)


def fresh_from_prefixes(model, rollouts, branch_at, key):
    """Reference: each prefix (real tokens before t) as its own left-padded prompt, generated afresh."""
    seq, seq_mask = np.asarray(rollouts.sequences), np.asarray(rollouts.sequence_mask)
    length = seq.shape[1]
    ids = np.zeros((branch_at.size, length), np.int32)
    mask = np.zeros((branch_at.size, length), bool)
    for row, (b, t) in enumerate((b, t) for b in range(len(branch_at)) for t in branch_at[b]):
        real = seq[b, :t][seq_mask[b, :t]]
        ids[row, length - len(real):], mask[row, length - len(real):] = real, True
    return generate(model, ids, mask, key=key, max_new_tokens=K)


@pytest.mark.parametrize("reuse_cache", [False, True, "4-slot blocks"],
                         ids=["prefill", "rollout_cache", "rollout_cache_4_slot_blocks"])
def test_branch_continuation_equals_generating_from_the_truncated_prefix(model, rollouts, reuse_cache):
    key = jax.random.key(9)
    cache = None if reuse_cache is False else rollouts.cache
    if reuse_cache == "4-slot blocks":  # the shared prefix spans several key blocks of its attention
        cache = cache.replace(block=4)
    out = continue_from(model, rollouts.sequences, rollouts.sequence_mask, BRANCH_AT, key=key, num_tokens=K,
                        cache=cache)
    ref = fresh_from_prefixes(model, rollouts, BRANCH_AT, key)
    assert out.tokens.shape == (BRANCH_AT.size, K)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)
    np.testing.assert_allclose(out.model_logprobs, ref.model_logprobs, atol=1e-4)
    np.testing.assert_array_equal(out.sequences, ref.sequences)  # c_t + continuation, left-aligned
    np.testing.assert_array_equal(out.sequence_mask, ref.sequence_mask)
    np.testing.assert_array_equal(out.completion_mask, ref.completion_mask)


def _largest_value(jaxpr) -> int:
    """Elements of the largest array any equation of `jaxpr` (sub-jaxprs included) produces."""
    from jax.extend.core import jaxprs_in_params
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
        for sub in jaxprs_in_params(eqn.params):
            biggest = max(biggest, _largest_value(sub))
    return biggest


def test_branching_shares_the_prefix_cache_instead_of_copying_it_per_candidate(model, rollouts):
    """c = 8 candidates per sequence: no array of the compiled call is as large as the prefix
    cache of one layer repeated c times (the old `jnp.repeat` of the whole cache was), and the
    returned cache holds the b prefixes once plus a K-slot private cache per candidate."""
    from flax import nnx

    from topd_jax.models.cache import BranchCache, slots_for
    from topd_jax.rollout.branch import continue_impl
    from topd_jax.rollout.sampling import SamplingConfig

    seq, seq_mask = rollouts.sequences, rollouts.sequence_mask
    b, length = seq.shape
    c = 8
    branch_at = np.tile(np.array([[8, 12, 16]]), (b, 3))[:, :c]  # every column has a real token before it
    out = continue_from(model, seq, seq_mask, branch_at, key=jax.random.key(0), num_tokens=K,
                        cache=rollouts.cache, return_cache=True)
    cache = out.cache
    assert isinstance(cache, BranchCache)
    kv, hd = CFG.num_kv_heads, CFG.head_dim
    assert all(x.shape == (b, kv, slots_for(length), hd) for x in cache.prefix.k + cache.prefix.v)
    assert all(x.shape == (b * c, kv, slots_for(K), hd) for x in cache.suffix.k + cache.suffix.v)
    fed = np.concatenate([np.ones((b * c, 1), bool), np.asarray(out.mask[:, :K - 1])], axis=1)  # re-fed token, then K-1
    np.testing.assert_array_equal(cache.suffix.mask[:, :K], fed)

    graphdef, state = nnx.split(model)
    keys = jax.random.split(jax.random.key(0), b * c)
    traced = jax.make_jaxpr(lambda st, cch: continue_impl(
        nnx.merge(graphdef, st), seq, seq_mask, jax.numpy.asarray(branch_at), keys, cch, num_tokens=K,
        sampling=SamplingConfig(1.0, 1.0, 0), eos_ids=(), pad_id=0, return_cache=False))(state, rollouts.cache)
    one_layer_repeated = b * c * kv * length * hd
    assert _largest_value(traced.jaxpr) < one_layer_repeated / 2


def test_branch_sequences_teacher_force_to_the_returned_log_probs(model, rollouts):
    out = continue_from(model, rollouts.sequences, rollouts.sequence_mask, BRANCH_AT, key=jax.random.key(9),
                        num_tokens=K)
    seq, seq_mask = np.asarray(out.sequences), np.asarray(out.sequence_mask)
    length = seq.shape[1] - K
    logits = jitted_forward(model)(seq, seq_mask)[:, length - 1:-1]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    ref = np.take_along_axis(logp, np.asarray(out.tokens)[..., None], axis=-1)[..., 0]
    assert np.abs(np.asarray(out.model_logprobs) - ref).max() < 1e-4


def test_bad_branch_points_are_refused_by_name(model, rollouts):
    seq, seq_mask = rollouts.sequences, rollouts.sequence_mask
    length = seq.shape[1]
    bad = BRANCH_AT.copy()
    bad[1, 0] = length + 1
    with pytest.raises(ValueError, match=rf"branch_at\[1, 0\] = {length + 1}"):
        continue_from(model, seq, seq_mask, bad, key=jax.random.key(0), num_tokens=K)
    bad[1, 0] = 0
    with pytest.raises(ValueError, match=r"branch_at\[1, 0\] = 0"):
        continue_from(model, seq, seq_mask, bad, key=jax.random.key(0), num_tokens=K)
    bad[1, 0] = 2  # row 1 has 3 prompt tokens, left-padded: columns 0..2 are padding
    with pytest.raises(ValueError, match="row 1 has no real token before it"):
        continue_from(model, seq, seq_mask, bad, key=jax.random.key(0), num_tokens=K)
    with pytest.raises(ValueError, match=r"branch_at \(2, 2\)"):
        continue_from(model, seq, seq_mask, BRANCH_AT[:2], key=jax.random.key(0), num_tokens=K)
    small = jax.tree.map(lambda x: x[:2] if x.ndim else x, rollouts.cache)  # rows 0, 1 of every array
    with pytest.raises(ValueError, match="expected batch 3"):
        continue_from(model, seq, seq_mask, BRANCH_AT, key=jax.random.key(0), num_tokens=K, cache=small)


def test_branch_points_are_the_first_candidates_then_the_length():
    candidates = np.zeros((3, 10), bool)
    candidates[0, [7, 2, 5]] = True
    candidates[1, [4]] = True
    at, valid = branch_points(jax.numpy.asarray(candidates), 2)
    np.testing.assert_array_equal(at, [[2, 5], [4, 10], [10, 10]])
    np.testing.assert_array_equal(valid, [[True, True], [True, False], [False, False]])


def test_readme_rollout_example_runs():
    import pathlib
    import re

    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    section = readme.read_text().split("\n## Rollout\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README's Rollout section has no python example"
    exec(compile(blocks[0], str(readme), "exec"), {})
