"""train(cfg): a few steps end to end — history, evals, metrics files, checkpoints, HF
export — plus the non-finite halt."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests._train_tiny import tiny_config
from topd_jax.train import loop
from topd_jax.train.loop import NonFiniteLossError, train


def test_opd_run_writes_history_evals_metrics_checkpoints_and_hf_export(tmp_path):
    cfg = tiny_config(tmp_path / "run", "eval.at_start=true", "eval.at_end=true", "checkpoint.export_hf=true",
                      "logging.every=2", steps=3)
    result = train(cfg)
    h = result.history
    assert [r["step"] for r in h] == [1.0, 2.0, 3.0]
    # Plain OPD, no suppression: the loss is the mean per-token reverse KL, i.e. token_kl.
    for r in h:
        assert r["loss"] == pytest.approx(r["token_kl"], rel=1e-5) and r["token_kl"] > 0
        assert r["opd_loss"] == pytest.approx(r["loss"], rel=1e-6) and r["grad_norm"] > 0
        assert 1 <= r["rollout_len"] <= 10 and r["skipped"] == 0
        assert 0 < r["time_update"] <= r["time_step"]
    # No warm-up: cosine from optim.lr to optim.min_lr over the 3 updates.
    lr, min_lr = 3e-3, 3e-4
    expect = [min_lr + (lr - min_lr) * 0.5 * (1 + np.cos(np.pi * s / 2)) for s in range(3)]
    np.testing.assert_allclose([r["lr"] for r in h], expect, rtol=1e-6)
    assert sorted(result.evals) == [0, 3] and all(0 <= a <= 1 for a in result.evals.values())
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = {x["step"]: x for x in lines if "loss" in x}
    assert sorted(rows) == [2, 3]  # logging.every=2, and the last step
    # A logged row is the mean over its interval's steps (plain numbers count as (x, 1)).
    for key in ("loss", "grad_norm", "lr", "rollout_len"):
        assert rows[2][key] == pytest.approx((h[0][key] + h[1][key]) / 2, rel=1e-6), key
        assert rows[3][key] == pytest.approx(h[2][key], rel=1e-6), key
    assert [(x["step"], x["eval_accuracy"]) for x in lines if "eval_accuracy" in x] == \
        [(0, result.evals[0]), (3, result.evals[3])]
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
    assert (result.hf_dir / "config.json").is_file()
    assert result.final_step == 3 and not result.preempted


def test_topd_run_logs_detector_guidance_and_label_metrics(tmp_path, monkeypatch):
    import dataclasses

    from tests.test_label_metrics import _fake_labeller, numpy_label_metrics, numpy_label_pairs
    from topd_jax.data.tasks import SYNTHETIC

    batches = []
    real = loop.prepare_batch
    monkeypatch.setattr(loop, "prepare_batch", lambda *a, **k: batches.append(real(*a, **k)) or batches[-1])
    # Label metrics from labels made of the ids (the random models write no grammatical chains).
    monkeypatch.setattr(loop, "run_task", lambda cfg: dataclasses.replace(SYNTHETIC, labeller=_fake_labeller))
    # kl_window: the loop's TOPD path without compiling continuation samplers (see test_algorithms)
    result = train(tiny_config(tmp_path / "run", "algorithm=topd", "topd.detector=kl_window",
                               "logging.label_metrics=true", "logging.every=2", steps=2))
    row = result.history[-1]
    # Each history row carries the label metrics of its step's batch ...
    for r, (batch, _, _) in zip(result.history, batches):
        expect = numpy_label_metrics(batch)
        np.testing.assert_allclose([r[k] for k in expect], list(expect.values()), rtol=1e-5)
    # ... and metrics.jsonl's row of the 2-step interval pools their (sum, count) pairs.
    pairs = [numpy_label_pairs(b) for b, _, _ in batches]
    pooled = {k: (pairs[0][k][0] + pairs[1][k][0]) / (pairs[0][k][1] + pairs[1][k][1]) for k in pairs[0]}
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    np.testing.assert_allclose([logged[k] for k in pooled], list(pooled.values()), rtol=1e-5)
    assert 0 < row["time_label_metrics"] and 0 < row["time_update"] <= row["time_step"]
    assert len(result.extras["label_example"]["words"]) > 0
    for key in ("traj_loss", "divergence", "false_alarm_fraction", "guided_points_per_rollout",
                "candidates_per_rollout"):
        assert key in row and np.isfinite(row[key]), key
    assert 0 < row["candidates_per_rollout"] <= 2  # topd.num_candidates=2
    assert 0 <= row["false_alarm_fraction"] <= 1 and row["divergence"] >= 0 and row["traj_loss"] >= 0
    assert 0 <= row["guided_points_per_rollout"] <= 1  # topd.max_guided_points=1


def test_non_finite_losses_in_a_row_halt_with_a_clear_message(tmp_path, monkeypatch):
    real = loop.load_model

    def nan_teacher(plan, mesh):
        model = real(plan, mesh)
        if plan.role == "teacher":
            nnx.update(model, jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), nnx.state(model)))
        return model

    monkeypatch.setattr(loop, "load_model", nan_teacher)
    with pytest.raises(NonFiniteLossError, match="2 steps in a row had a non-finite loss"):
        train(tiny_config(tmp_path / "run", "max_nonfinite_steps=2", steps=5))
