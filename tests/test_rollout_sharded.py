"""Generation and branching under a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices equal
the single-device results."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tests._hf_tiny import random_model
from topd_jax.models import ModelConfig
from topd_jax.rollout import continue_from, generate
from topd_jax.sharding import MeshConfig, make_mesh, shard_model

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=48, rope_theta=1e4)
LENGTHS, P, N, K = [5, 2, 4, 1], 5, 8, 4
BRANCH_AT = np.repeat(np.array([[3, 9], [7, 12], [6, 10], [5, 13]]), 2, axis=0)  # 2 samples per prompt
SETTINGS = dict(temperature=0.9, top_k=20, eos_ids=(7,))


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def prompts():
    ids = np.random.default_rng(4).integers(0, CFG.vocab_size, (len(LENGTHS), P)).astype(np.int32)
    return ids, np.arange(P)[None, :] >= P - np.array(LENGTHS)[:, None]


@pytest.fixture(scope="module")
def models(mesh):
    """The same random model on one device and sharded over the mesh."""
    return random_model(CFG, seed=2, scale=0.3), shard_model(random_model(CFG, seed=2, scale=0.3), mesh)


def run_both(fn, models, mesh):
    """fn(model) on one device, then fn(sharded model) inside the mesh."""
    plain_model, sharded_model = models
    plain = fn(plain_model)
    with jax.set_mesh(mesh):
        sharded = fn(sharded_model)
    return plain, sharded


@pytest.fixture(scope="module")
def rollouts(models, mesh, prompts):
    ids, mask = prompts
    return run_both(lambda m: generate(m, ids, mask, key=jax.random.key(1), max_new_tokens=N, num_samples=2,
                                       return_cache=True, **SETTINGS), models, mesh)


def assert_same(plain, sharded):
    np.testing.assert_array_equal(plain.tokens, sharded.tokens)
    np.testing.assert_array_equal(plain.mask, sharded.mask)
    np.testing.assert_array_equal(plain.sequences, sharded.sequences)
    np.testing.assert_allclose(plain.logprobs, sharded.logprobs, atol=1e-4)
    np.testing.assert_allclose(plain.model_logprobs, sharded.model_logprobs, atol=1e-4)


def test_sharded_generation_equals_unsharded(mesh, rollouts):
    plain, sharded = rollouts
    assert_same(plain, sharded)
    # the cache really was split: rows over data x fsdp, kv heads over tensor
    want = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "tensor", None, None))
    for layer in sharded.cache.k + sharded.cache.v:
        assert layer.sharding.is_equivalent_to(want, 4), layer.sharding


def test_sharded_branching_from_the_rollout_cache_equals_unsharded(mesh, models, rollouts):
    caches = iter([r.cache for r in rollouts])  # each side branches from its own cache
    seq, seq_mask = rollouts[0].sequences, rollouts[0].sequence_mask
    assert_same(*run_both(lambda m: continue_from(m, seq, seq_mask, BRANCH_AT, key=jax.random.key(2), num_tokens=K,
                                                  cache=next(caches), **SETTINGS), models, mesh))
