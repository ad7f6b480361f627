"""``topd.detector=oracle`` (labels instead of a detector) and ``topd.guidance_window`` (the
TOPD-K1 arm) of issue 13 §4."""

import jax
import numpy as np
import pytest

from tests._train_tiny import tiny_config
from topd_jax.algorithms import topd
from topd_jax.data.labelled import DERAILED, FORCED, FORK, NONE, RECOVERY, SURFACE

# Two rollouts of 10 columns (2 prompt columns, then the completion), labelled by hand.
LABELS = np.array([
    [NONE, NONE, FORCED, SURFACE, FORK, FORCED, SURFACE, FORK, FORCED, NONE],
    [NONE, NONE, SURFACE, FORCED, SURFACE, DERAILED, RECOVERY, FORCED, SURFACE, FORCED],
])
LOSS_MASK = LABELS != NONE
# ℓ_t: candidates (top 3, min separation 1) at columns 3, 4, 6 (row 0) and 2, 5, 8 (row 1).
LOSS = np.zeros(LABELS.shape, np.float32)
LOSS[0, [3, 4, 6]] = [3.0, 2.0, 1.0]
LOSS[1, [2, 5, 8]] = [1.0, 3.0, 2.0]


def _classify(regime="low_divergence", loss=LOSS):
    cand, pos, valid, _ = topd.candidate_slots(loss, LOSS_MASK, mode="top_c", num=3, min_separation=1,
                                               quantile=0.8, rollback=1)
    det = topd.oracle_detection(LABELS, pos, valid)
    cand, d_tok, suppressed, idx, g_valid, sums = topd.classify(
        cand, pos, valid, det.d, loss, LOSS_MASK, det.defined, None, quantile=0.3, regime=regime, suppress=True,
        guidance=True, max_per_row=1, oracle=True)
    guided_cols = np.where(np.asarray(g_valid), np.take_along_axis(np.asarray(pos), np.asarray(idx), 1), -1)
    return np.asarray(cand), np.asarray(d_tok), np.asarray(suppressed), guided_cols[:, 0], sums


def test_oracle_suppresses_exactly_the_surface_candidates_and_guides_a_fork():
    cand, d_tok, suppressed, guided, sums = _classify()
    np.testing.assert_array_equal(np.flatnonzero(cand[0]), [3, 4, 6])
    np.testing.assert_array_equal(suppressed, cand & (LABELS == SURFACE))
    assert suppressed.sum() == 4 and float(sums["low"]) == 4.0
    np.testing.assert_array_equal(d_tok[cand], [0.0, 1.0, 0.0, 0.0, 0.5, 0.0])  # SURF 0, FORK 1, other 0.5
    assert guided[0] == 4 and LABELS[0, 4] == FORK
    assert guided[1] == -1  # row 1's candidates: SURFACE, DERAILED, SURFACE -- no fork, no guidance
    assert float(sums["guided"]) == 1.0


def test_oracle_guides_a_recovery_candidate_over_a_higher_loss_non_fork():
    loss = LOSS.copy()
    loss[1] = 0.0
    loss[1, [2, 5, 6]] = [1.0, 3.0, 2.0]  # SURFACE, DERAILED (highest ℓ), RECOVERY
    cand, _, suppressed, guided, _ = _classify(loss=loss)
    np.testing.assert_array_equal(np.flatnonzero(cand[1]), [2, 5, 6])
    np.testing.assert_array_equal(np.flatnonzero(suppressed[1]), [2])
    assert guided[1] == 6 and LABELS[1, 6] == RECOVERY


def test_oracle_high_divergence_regime_suppresses_the_forks_instead():
    cand, _, suppressed, _, _ = _classify(regime="high_divergence")
    np.testing.assert_array_equal(suppressed, cand & np.isin(LABELS, [FORK, RECOVERY]))


def test_oracle_refuses_a_task_without_labeller(tmp_path):
    cfg = tiny_config(tmp_path, "data.source=files", "data.train_files=[p.jsonl]", "algorithm=topd",
                      "topd.detector=oracle")
    with pytest.raises(ValueError, match=r"detector=oracle .*data.source='files'.* no labeller"):
        topd.oracle_labels(cfg, {"problems": ["x"]}, {})


def test_oracle_labels_repeat_each_problem_over_its_rollouts(tmp_path):
    from topd_jax.data.synthetic import SyntheticTokenizer
    cfg = tiny_config(tmp_path, "algorithm=topd", "topd.detector=oracle")  # synthetic task, rollout.n=2
    tok = SyntheticTokenizer()
    prompts = ["a = 3 ; b = a + 2 ; ? b", "a = 3 ; b = a + 2 ; c = b + 1 ; ? c"]  # one step, two steps
    sols = ["b = 3 + 2 = 5 ; answer 5", "b = 3 + 2 = 6 ; answer 6"]  # rows 2k, 2k+1 answer prompt k
    rows = [tok.encode(p) + tok.encode(s, add_bos=False) + [tok.eos_id] for p in prompts for s in sols]
    width = max(map(len, rows))
    ids = np.full((4, width), tok.pad_id, np.int32)
    mask = np.zeros((4, width), bool)
    for r, row in enumerate(rows):
        n_prompt = len(tok.encode(prompts[r // 2]))
        ids[r, :len(row)] = row
        mask[r, n_prompt:len(row)] = True
    labels = topd.oracle_labels(cfg, {"problems": prompts}, {"ids": ids, "loss_mask": mask})["labels"]
    assert labels.shape == (4, width)
    result_col = [np.flatnonzero(mask[r])[6] for r in range(4)]  # "b = X op Y = V": V is the 7th token
    assert [labels[r, c] for r, c in enumerate(result_col)] == [FORK] * 4
    # after b's value: prompt 0 ends (';' forced), prompt 1 goes on to c (a connective: SURFACE);
    # after the wrong value 6 nothing repairs it (RECOVERY) in either problem.
    after = [labels[r, c + 1] for r, c in enumerate(result_col)]
    assert after == [FORCED, RECOVERY, SURFACE, RECOVERY]


@pytest.fixture(scope="module")
def mesh_and_teacher():
    """A one-device mesh and the tiny teacher of ``tests._train_tiny``."""
    from tests._train_tiny import SMALL
    from topd_jax.models import ModelConfig, init_model
    from topd_jax.sharding import MeshConfig, make_mesh
    mesh = make_mesh(MeshConfig(data=1, fsdp=1), devices=jax.devices()[:1])
    return mesh, init_model(ModelConfig(vocab_size=128, hidden_size=24, num_layers=1, **SMALL), seed=1)


@pytest.mark.parametrize("guidance_window, targets", [(1, [1, 0]), (None, [4, 0])])
def test_guidance_window_sets_the_target_tokens_per_guided_row(tmp_path, mesh_and_teacher, guidance_window,
                                                               targets):
    """guidance_window=1 (TOPD-K1): one target token per guidance row; None: the K-token window.
    Row 0 is guided at its FORK candidate (column 4, four completion tokens follow), row 1 not."""
    from topd_jax.algorithms import Frozen

    mesh, t = mesh_and_teacher
    extra = [] if guidance_window is None else [f"topd.guidance_window={guidance_window}"]
    cfg = tiny_config(tmp_path, "algorithm=topd", "topd.detector=oracle", "topd.guidance_target=student_positions",
                      *extra)  # student_positions: the rollout's own future, no sampling
    slots = topd.candidate_slots(LOSS, LOSS_MASK, mode="top_c", num=3, min_separation=1, quantile=0.8, rollback=1)
    cand, pos, valid, _ = slots
    det = topd.oracle_detection(LABELS, pos, valid)
    *_, idx, g_valid, _ = topd.classify(cand, pos, valid, det.d, LOSS, LOSS_MASK, det.defined, None, quantile=0.3,
                                        regime="low_divergence", suppress=True, guidance=True, max_per_row=1,
                                        oracle=True)
    ids = np.random.default_rng(0).integers(3, 128, LABELS.shape).astype(np.int32)
    rows = {"ids": ids, "seq_mask": np.ones(LABELS.shape, bool), "loss_mask": LOSS_MASK}
    with jax.set_mesh(mesh):
        g = topd.guidance_batch(cfg, rows, slots, idx, g_valid, None, jax.random.key(0),
                                Frozen(t, t.lm_head_weight(), (2,), 0), {})
    window = np.asarray(g["g_window"])
    assert window.shape == (2, cfg.topd.window)
    assert window.sum(axis=1).tolist() == targets
    np.testing.assert_array_equal(np.asarray(g["g_targets"])[0, :targets[0]], ids[0, 4:4 + targets[0]])
