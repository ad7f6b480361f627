"""dtype policy (param / compute dtypes) and per-layer rematerialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests._hf_tiny import random_model
from topd_jax.models import ModelConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  intermediate_size=48, tie_word_embeddings=False)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
MASK = jnp.asarray(np.arange(8)[None] >= np.array([0, 3])[:, None])


def _with_config(model, cfg):
    """The same weights under another config (dtype / remat), cast to its param dtype."""
    other = random_model(cfg)
    nnx.update(other, jax.tree.map(lambda x: x.astype(cfg.weight_dtype), nnx.state(model, nnx.Param)))
    return other


def _jit_parts(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        hidden, _ = m.hidden_states(IDS, positions=jnp.maximum(jnp.cumsum(MASK, 1) - 1, 0), attention_mask=MASK)
        return hidden, m.compute_logits(hidden)

    return run(state)


@pytest.mark.parametrize("param_dtype,dtype", [("bfloat16", "bfloat16"), ("float32", "bfloat16")])
def test_bf16_policy_keeps_param_dtype_and_float32_logits(param_dtype, dtype):
    ref_model = random_model(CFG)
    model = _with_config(ref_model, CFG.replace(param_dtype=param_dtype, dtype=dtype))
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(param_dtype)}
    hidden, logits = _jit_parts(model)
    assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    assert model.init_cache(2, 4).k[0].dtype == jnp.bfloat16
    _, ref = _jit_parts(ref_model)
    real = np.asarray(MASK)
    err = np.abs(np.asarray(logits) - np.asarray(ref))[real].max()
    assert err < 0.05 * np.abs(np.asarray(ref))[real].max()  # bf16 has ~3 significant digits


@pytest.mark.parametrize("policy", ["full", "dots_no_batch"])
def test_remat_gives_the_same_gradients(policy):
    base = random_model(CFG)
    remat = _with_config(base, CFG.replace(remat=policy))

    def grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        @jax.jit
        def g(params):
            def loss(params):
                logits = nnx.merge(graphdef, params, rest)(IDS, attention_mask=MASK)
                return jnp.mean(jax.nn.logsumexp(logits, -1) * MASK)

            return jax.grad(loss)(params)

        return jax.tree.leaves(g(params))

    graphdef, state = nnx.split(remat)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(IDS, attention_mask=MASK))(state))
    assert jaxpr.count("remat") == CFG.num_layers  # one checkpointed region per layer
    for a, b in zip(grads(base), grads(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
