"""Logical-axis sharding: rules, mesh, and sharded forward == single-device forward (8 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tests._hf_tiny import random_model
from topd_jax.models import CACHE_KV_AXES, CACHE_MASK_AXES, ModelConfig, default_positions, init_model
from topd_jax.sharding import LOGICAL_AXIS_RULES, MeshConfig, constrain, logical_to_spec, make_mesh, shard_model

CFG = ModelConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=96, tie_word_embeddings=False, rope_theta=1e4)
MESH_SHAPE = {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])


def test_spec_follows_the_rules_table():
    assert logical_to_spec(("heads", "head_dim", "embed"), (4, 16, 64), MESH_SHAPE) == P("tensor", None, "fsdp")
    assert logical_to_spec(("act_batch", "act_seq", "act_embed"), (8, 5, 64), MESH_SHAPE) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("norm",), (64,), MESH_SHAPE) == P(None)


def test_spec_leaves_indivisible_or_reused_axes_replicated():
    # 2 KV heads cannot split over tensor=4; batch 2 takes "data" but not also "fsdp"
    assert logical_to_spec(("kv_heads",), (2,), {"tensor": 4}) == P(None)
    assert logical_to_spec(("act_batch",), (2,), MESH_SHAPE) == P("data")
    assert logical_to_spec(("embed", "embed"), (4, 4), MESH_SHAPE) == P("fsdp", None)
    assert logical_to_spec(("no_such_axis",), (4,), MESH_SHAPE) == P(None)
    with pytest.raises(ValueError, match="do not match"):
        logical_to_spec(("embed",), (4, 4), MESH_SHAPE)


def test_every_parameter_has_logical_axes_known_to_the_rules():
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    for qkv_bias, qk_norm in ((True, False), (False, True)):
        model = nnx.eval_shape(lambda: random_model(CFG.replace(qkv_bias=qkv_bias, qk_norm=qk_norm)))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            axes = var.get_metadata()["out_sharding"]
            assert len(axes) == var.get_value().ndim and set(axes) <= known, path
    assert set(CACHE_KV_AXES + CACHE_MASK_AXES) <= known


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((2, 3, 4))
    assert constrain(x, ("act_batch", "act_seq", "act_embed")) is x


def test_make_mesh_resolves_minus_one_and_names_bad_sizes():
    devices = jax.devices()
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.shape["fsdp"] == len(devices)
    with pytest.raises(ValueError, match="not a multiple"):
        MeshConfig(data=3, fsdp=-1).resolve(8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        MeshConfig(data=2, fsdp=2, tensor=1).resolve(8)


def _forward(graphdef):
    @jax.jit
    def fwd(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask)

    return fwd


def test_sharded_forward_equals_single_device(mesh):
    model = random_model(CFG)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (4, 12)), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None] >= np.array([0, 3, 7, 11])[:, None])
    ref = np.asarray(_forward(graphdef)(state, ids, mask))

    shard_model(model, mesh)
    sharded_state = nnx.state(model)
    q = model.layers[0].attn.q_proj[...]
    assert q.sharding.spec == P("tensor", None, "fsdp") and len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (2, 16, 32)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        got = _forward(graphdef)(sharded_state, jax.device_put(ids, batch), jax.device_put(mask, batch))
    assert got.sharding.spec == P(("data", "fsdp"), None, "tensor")
    assert np.abs(np.asarray(got) - ref).max() < 1e-5


def test_sharded_cached_decode_equals_single_device(mesh):
    model = random_model(CFG, seed=1)
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (4, 6)), jnp.int32)
    mask = jnp.ones((4, 6), bool)
    positions = default_positions(mask)

    @jax.jit
    def prefill_then_step(state, cache):
        m = nnx.merge(graphdef, state)
        _, cache = m.hidden_states(ids[:, :5], positions=positions[:, :5], attention_mask=mask[:, :5], cache=cache)
        hidden, cache = m.hidden_states(ids[:, 5:], positions=positions[:, 5:], attention_mask=mask[:, 5:],
                                        cache=cache)
        return m.compute_logits(hidden), cache

    ref, _ = prefill_then_step(state, model.init_cache(4, 8))
    shard_model(model, mesh)
    cache = model.init_cache(4, 8)
    spec = lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, dict(mesh.shape)))
    cache = cache.map_kv(lambda x: jax.device_put(x, spec(CACHE_KV_AXES, x)))  # each layer's [B, kv_heads, S, h]
    cache = cache.replace(mask=jax.device_put(cache.mask, spec(CACHE_MASK_AXES, cache.mask)))
    with jax.set_mesh(mesh):
        got, new_cache = prefill_then_step(nnx.state(model), cache)
    assert int(new_cache.index) == 6
    assert np.abs(np.asarray(got) - np.asarray(ref)).max() < 1e-5


def test_changing_the_rules_changes_the_parallelism(mesh):
    """Rules, not the model file, decide the layout: pure data parallelism replicates weights."""
    model = random_model(CFG)
    shard_model(model, mesh, rules=(("act_batch", ("data", "fsdp", "tensor")),))
    assert model.layers[0].attn.q_proj[...].sharding.spec == P(None, None, None)


def test_init_model_creates_parameters_directly_in_their_shardings(mesh):
    model = init_model(CFG, seed=3, mesh=mesh)
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    assert model.layers[1].mlp.gate_proj[...].sharding.spec == P("tensor", "fsdp")
    assert abs(float(np.std(np.asarray(model.embed[...]))) - 0.02) < 0.002  # HF's initializer_range
    assert np.all(np.asarray(model.final_norm.weight[...]) == 1.0)
