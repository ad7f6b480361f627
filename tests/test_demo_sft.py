"""Supervised CE for the demo models: the loss against NumPy, and learning on a tiny subset."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from topd_jax.data import synthetic
from topd_jax.models import ModelConfig, init_model
from topd_jax.demos import demo
from topd_jax.config.schema import OptimConfig
from topd_jax.demos.sft import train_sft

TINY = ModelConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                   head_dim=16, intermediate_size=64, max_position_embeddings=64)


def test_demo_sft_loss_is_the_trainers_ce_and_matches_numpy():
    """The demo's SFT runs ``algorithm=sft``'s objective: on a batch of demo rows its (sum, count)
    is the summed next-token NLL of the targets from the model's own logits, computed in NumPy."""
    from topd_jax.algorithms.objective import make_loss_fn
    from topd_jax.demos.sft import SFT_SPEC, sft_rows

    rng = np.random.default_rng(0)
    model = init_model(TINY, seed=0)
    ids = rng.integers(0, 128, size=(2, 6)).astype(np.int32)
    attention = np.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
    target = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]], bool)
    graphdef, params = nnx.split(model)
    terms, metrics = make_loss_fn(SFT_SPEC, graphdef)(
        params, sft_rows({"input_ids": ids, "attention_mask": attention, "loss_mask": target}), None)
    logits = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(attention)), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -sum(logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 6) if target[b, t])
    total, count = terms["opd"]
    assert float(count) == target.sum() == 6 and float(metrics["ce"][1]) == 6
    np.testing.assert_allclose(float(total), want, rtol=1e-5)


def test_train_sft_lowers_the_loss_and_solves_a_memorised_subset():
    # 4 one-step problems mod 3, always the same surface form: memorisable in a few dozen steps.
    problems = synthetic.generate_problems(4, 0, min_steps=1, max_steps=1, modulus=3)
    style = synthetic.Style(connective_probs=(1.0, 0.0, 0.0, 0.0), swap_prob=0.0)
    p_len, c_len = 1 + 4 + 6 + 2, 8 + 3
    batches = demo.sft_batches(problems, 8, 0, style=style, slip_prob=0.0, prompt_len=p_len,
                               completion_len=c_len)
    model = init_model(TINY, seed=0)
    before = demo.accuracy(model, problems, max_new_tokens=c_len, prompt_len=p_len, batch_size=4)
    trained, losses = train_sft(model, batches, steps=80, optim=OptimConfig(lr=1e-2, min_lr=1e-3),
                                progress=False, log_every=20)
    after = demo.accuracy(trained, problems, max_new_tokens=c_len, prompt_len=p_len, batch_size=4)
    assert len(losses) == 4 and losses[-1] < 0.25 * losses[0], losses
    assert before <= 0.25 and after == 1.0, (before, after)
    # the caller's model is untouched (its buffers were copied before donation)
    assert jnp.array_equal(jax.tree.leaves(nnx.state(model))[0],
                           jax.tree.leaves(nnx.state(init_model(TINY, seed=0)))[0])


def test_train_sft_with_zero_steps_returns_the_same_weights():
    model = init_model(TINY, seed=1)
    out, losses = train_sft(model, iter(()), steps=0, optim=OptimConfig(lr=1e-3), progress=False)
    assert losses == [] and all(jnp.array_equal(a, b) for a, b in
                                zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(out))))
