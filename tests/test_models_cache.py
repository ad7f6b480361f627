"""KV cache (slot-mask design of the model contract) and the forward-pass contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests._hf_tiny import random_model
from topd_jax.models import KVCache, ModelConfig, Qwen, default_positions

QWEN3 = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    intermediate_size=48, rope_theta=1e4, tie_word_embeddings=False)
QWEN2 = QWEN3.replace(qkv_bias=True, qk_norm=False, head_dim=8, tie_word_embeddings=True)
# one batch shape throughout, so each jitted function compiles once per family
LENGTHS, TOTAL, SLOTS = [9, 6, 2], 9, 12


def functional(model):
    """Jitted full forward and cached step through nnx.split / nnx.merge (as rollout uses them)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def full(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask)

    @jax.jit
    def step(state, ids, positions, mask, cache):
        m = nnx.merge(graphdef, state)
        hidden, cache = m.hidden_states(ids, positions=positions, attention_mask=mask, cache=cache)
        return m.compute_logits(hidden), cache

    return (lambda ids, mask: full(state, ids, mask)), (lambda *a: step(state, *a))


def left_padded(vocab, lengths, total, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (len(lengths), total)).astype(np.int32)
    mask = np.arange(total)[None, :] >= (total - np.array(lengths))[:, None]
    return jnp.asarray(ids), jnp.asarray(mask)


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def model_fns(request):
    cfg = QWEN3 if request.param == "qwen3" else QWEN2
    model = random_model(cfg)
    return model, *functional(model)


def test_token_by_token_decode_equals_full_forward(model_fns):
    model, full, step = model_fns
    ids, mask = left_padded(model.config.vocab_size, LENGTHS, TOTAL)
    positions = default_positions(mask)
    ref = np.asarray(full(ids, mask))
    cache = model.init_cache(len(LENGTHS), SLOTS)
    logits, cache = step(ids[:, :3], positions[:, :3], mask[:, :3], cache)  # prefill 3 slots
    got = [np.asarray(logits)]
    for t in range(3, TOTAL):
        logits, cache = step(ids[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    assert int(cache.index) == TOTAL
    np.testing.assert_array_equal(np.asarray(cache.mask[:, :TOTAL]), np.asarray(mask))
    assert not np.asarray(cache.mask[:, TOTAL:]).any()
    assert np.abs(got - ref)[np.asarray(mask)].max() < 1e-5


def test_decode_reads_no_slot_past_the_filled_length(model_fns):
    """The unfilled slots hold NaN keys and values. A step that read them, even masked, would
    return NaN (0 * NaN in the probabilities-times-values product), as the all-slots decode
    did; attention over the filled blocks only (4-slot blocks here) never touches them."""
    model, full, step = model_fns
    ids, mask = left_padded(model.config.vocab_size, LENGTHS, TOTAL, seed=7)
    positions = default_positions(mask)
    ref = np.asarray(full(ids, mask))
    cache = model.init_cache(len(LENGTHS), SLOTS, block=4).map_kv(lambda x: jnp.full_like(x, jnp.nan))
    logits, cache = step(ids[:, :3], positions[:, :3], mask[:, :3], cache)
    got = [np.asarray(logits)]
    for t in range(3, TOTAL):
        logits, cache = step(ids[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    assert np.isfinite(got).all()
    assert np.abs(got - ref)[np.asarray(mask)].max() < 1e-5
    assert np.isnan(np.asarray(cache.k[0][:, :, TOTAL:])).all()  # the tail really was NaN throughout


def test_chunked_prefill_equals_full_forward(model_fns):
    model, full, step = model_fns
    ids, mask = left_padded(model.config.vocab_size, LENGTHS, TOTAL, seed=3)
    positions = default_positions(mask)
    ref = np.asarray(full(ids, mask))
    cache = model.init_cache(len(LENGTHS), SLOTS)
    outs = []
    for a in range(0, TOTAL, 3):
        logits, cache = step(ids[:, a:a + 3], positions[:, a:a + 3], mask[:, a:a + 3], cache)
        outs.append(np.asarray(logits))
    assert np.abs(np.concatenate(outs, 1) - ref)[np.asarray(mask)].max() < 1e-5


def test_decode_after_masking_a_suffix_equals_forward_of_the_prefix(model_fns):
    """Rollout branching: prefill a whole rollout, hide slots >= t_b of row b, append a token."""
    model, full, step = model_fns
    n = len(LENGTHS)
    ids, mask = left_padded(model.config.vocab_size, [TOTAL] * n, TOTAL, seed=5)
    cache = model.init_cache(n, SLOTS)
    _, cache = step(ids, default_positions(mask), mask, cache)
    cut = np.array([3, 6, 1])  # row b keeps its first cut[b] tokens
    cache = cache.replace(mask=cache.mask & (jnp.arange(SLOTS)[None, :] < cut[:, None]))
    new_tok = jnp.array([[11], [42], [7]], jnp.int32)
    logits, cache = step(new_tok, jnp.asarray(cut[:, None], jnp.int32), jnp.ones((n, 1), bool), cache)
    assert int(cache.index) == TOTAL + 1
    # reference: each row's prefix + new token, left-padded to the common shape
    ref_ids = np.zeros((n, TOTAL), np.int32)
    ref_mask = np.zeros((n, TOTAL), bool)
    for b in range(n):
        ref_ids[b, TOTAL - cut[b] - 1:] = np.concatenate([np.asarray(ids[b, :cut[b]]), np.asarray(new_tok[b])])
        ref_mask[b, TOTAL - cut[b] - 1:] = True
    ref = np.asarray(full(jnp.asarray(ref_ids), jnp.asarray(ref_mask)))[:, -1]
    assert np.abs(np.asarray(logits)[:, 0] - ref).max() < 1e-5


def test_cache_layout_and_dtypes():
    model = random_model(QWEN3)
    cache = model.init_cache(3, 7)
    assert isinstance(cache, KVCache)
    assert len(cache.k) == len(cache.v) == 2  # one buffer per layer
    assert all(x.shape == (3, 2, 7, 16) and x.dtype == jnp.float32 for x in cache.k + cache.v)  # [B, kv, S, h]
    assert cache.mask.dtype == jnp.bool_ and cache.mask.shape == (3, 7) and cache.max_len == 7
    assert cache.index.dtype == jnp.int32 and cache.index.shape == ()
    assert model.init_cache(1, 4, dtype=jnp.bfloat16).k[0].dtype == jnp.bfloat16
    assert jax.tree.leaves(cache)  # a pytree: passes through jit


def test_compute_logits_is_hidden_times_lm_head_weight(model_fns):
    model, full, _ = model_fns
    cfg = model.config
    ids, mask = left_padded(cfg.vocab_size, LENGTHS, TOTAL)
    graphdef, state = nnx.split(model)

    @jax.jit
    def parts(state):
        m = nnx.merge(graphdef, state)
        hidden, cache = m.hidden_states(ids, positions=default_positions(mask), attention_mask=mask)
        return hidden, cache, m.compute_logits(hidden), m.lm_head_weight(), m.embedding_table()

    hidden, cache, logits, w, table = parts(state)
    assert cache is None and hidden.shape == (len(LENGTHS), TOTAL, cfg.hidden_size) and hidden.dtype == jnp.float32
    assert w.shape == (cfg.hidden_size, cfg.vocab_size) and table.shape == (cfg.vocab_size, cfg.hidden_size)
    np.testing.assert_allclose(logits, np.asarray(hidden) @ np.asarray(w), atol=1e-5)
    np.testing.assert_allclose(logits, full(ids, mask), atol=1e-6)
    if cfg.tie_word_embeddings:
        np.testing.assert_array_equal(w, np.asarray(table).T)


def test_default_positions_count_real_tokens_for_left_and_right_padding():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(default_positions(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])
