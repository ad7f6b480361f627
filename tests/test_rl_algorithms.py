"""GRPO and TAPO wired into the trainer: the batch they prepare, the loss, the update.

The policy's *outputs* are scripted where the test needs specific text (a tiny random model
never writes a solution, let alone a tagged construction): ``opd.sample_rollouts`` returns
right and slipped solutions of the synthetic task, ``tapo.generate`` answers each synthesis
prompt with the programmatic construction (``synthetic.construction_target``). Everything
after that — grading, DCS, parsing, splicing onto the rollout's own ids, G_ref, the
old-policy pass, OTS, the loss and the update — runs for real.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topd_jax.algorithms import Frozen, build_objective, grpo, opd, tapo
from topd_jax.algorithms.rl_objective import RlSpec, add_rl_normalizers
from topd_jax.configs import DEMO_CONFIG
from topd_jax.data import synthetic
from topd_jax.data.prompts import collate
from topd_jax.models import init_model
from topd_jax.rollout.engine import assemble
from topd_jax.sharding import MeshConfig, make_mesh
from topd_jax.config.loader import parse_cli
from topd_jax.demos.demo import model_config
from topd_jax.train.optim import lr_schedule, make_optimizer
from topd_jax.train.setup import plan_run
from topd_jax.train.state import create_train_state
from topd_jax.train.step import TrainStep

N, P, M = 6, 2, 2  # rollouts per prompt, prompts, constructions per prompt


def _cfg(algorithm: str, *extra: str):
    return parse_cli([f"algorithm={algorithm}", f"rollout.n={N}", f"data.prompts_per_step={P}",
                      "tapo.n_pos=2", "tapo.n_neg=2", f"tapo.m_max={M}", "steps=4", "rollout.max_new_tokens=40", "optim.lr=1e-2",
                      "optim.warmup_fraction=0", "eval.at_start=false", "eval.at_end=false",
                      "output_dir=/tmp/unused", *extra], default_config=DEMO_CONFIG)


def _completion_arrays(texts, tok, width):
    ids, mask = np.full((len(texts), width), tok.pad_id, np.int32), np.zeros((len(texts), width), bool)
    for i, t in enumerate(texts):
        row = tok.encode(t, add_bos=False) + [tok.eos_id]
        ids[i, :len(row)], mask[i, :len(row)] = row, True
    return ids, mask


def _fake_generation(prefix_ids, prefix_mask, texts, tok, width):
    ids, mask = _completion_arrays(texts, tok, width)
    zeros = jnp.zeros(ids.shape, jnp.float32)
    decoded = (jnp.asarray(ids), jnp.asarray(mask), zeros, zeros, jnp.ones(len(texts), bool), None)
    return assemble(jnp.asarray(prefix_ids), jnp.asarray(prefix_mask), decoded, None, tok.pad_id)


@pytest.fixture(scope="module")
def setup():
    cfg = _cfg("tapo")
    plan = plan_run(cfg)
    problems = synthetic.make_splits(**_split_args(cfg))[0][:P]
    assert [p.prompt for p in problems] == [e.problem for e in plan.train_examples[:P]]
    prompts = collate(plan.train_examples[:P], cfg.data.max_prompt_len, plan.text.pad_id)
    student = init_model(model_config(cfg.student), seed=0)
    frozen = Frozen(None, jnp.zeros((1, 1)), plan.text.eos_ids, plan.text.pad_id, text=plan.text)
    return cfg, plan, problems, prompts, student, frozen


def _split_args(cfg):
    s = cfg.data.synthetic
    return dict(num_train=s.num_train, num_eval=s.num_eval, seed=s.seed, min_steps=s.min_steps,
                max_steps=s.max_steps, modulus=s.modulus)


def _rollout_texts(problems):
    """Per problem: 3 right solutions, then 3 with a slip at the first step (wrong answers)."""
    rng, texts = np.random.default_rng(0), []
    for p in problems:
        texts += [synthetic.reference_solution(p, rng, synthetic.STUDENT_STYLE) for _ in range(3)]
        texts += [synthetic.render_solution(p, synthetic.slipped_values(p, 0, rng), rng, synthetic.STUDENT_STYLE)
                  for _ in range(3)]
    return texts


def _script(monkeypatch, cfg, problems, tok, *, spoil_first: bool = True, garble_second: bool = False):
    """Scripted rollouts and construction replies; returns the list of replies written."""
    texts = _rollout_texts(problems)

    def sample(cfg_, model, prompts, key, frozen, **kw):
        rows = np.repeat(np.asarray(prompts["prompt_ids"]), cfg_.rollout.n, axis=0)
        masks = np.repeat(np.asarray(prompts["prompt_mask"]), cfg_.rollout.n, axis=0)
        return _fake_generation(rows, masks, texts, tok, kw["max_new_tokens"])

    by_prompt = {p.prompt: p for p in problems}
    written = []

    def generate(model, ids, mask, *, max_new_tokens, pad_id, **kw):
        replies, rng = [], np.random.default_rng(1)
        for row, m in zip(np.asarray(ids), np.asarray(mask)):
            found = re.match(r"fix (.*? \? [a-h]) ; (.*? answer \d+) ; (.*)", tok.decode(row[m]))
            reply = synthetic.construction_target(by_prompt[found.group(1)], found.group(2), rng)
            if spoil_first and not written:  # one wrong construction: G_ref has variance
                reply = re.sub(r"answer (\d+)", lambda g: f"answer {(int(g.group(1)) + 1) % 7}", reply)
            if garble_second and len(written) == 1:
                reply = reply.replace("</analysis>", "")
            written.append(reply)
            replies.append(reply)
        return _fake_generation(ids, mask, replies, tok, max_new_tokens)

    monkeypatch.setattr(opd, "sample_rollouts", sample)
    monkeypatch.setattr(tapo, "generate", generate)
    return written


def test_tapo_batch_adds_spliced_constructions_as_their_own_group(setup, monkeypatch):
    cfg, plan, problems, prompts, student, frozen = setup
    tok = synthetic.SyntheticTokenizer(construction_words=True)
    _script(monkeypatch, cfg, problems, tok)
    batch, metrics, gen = tapo.prepare(cfg, student, prompts, jax.random.key(0), frozen, {})
    term = np.asarray(batch["term"])
    # Prompt-major: each prompt's 6 rollouts, then its 2 construction slots (both used: 3 wrong >= n_neg).
    assert term.tolist() == ([0] * N + [1] * M) * P
    assert metrics["dcs_pass_fraction"] == (2.0, 2)
    assert metrics["constructions_kept"][0] == P * M
    ids, loss_mask = np.asarray(batch["ids"]), np.asarray(batch["loss_mask"])
    plen = cfg.data.max_prompt_len
    rollouts = np.asarray(gen.sequences)
    for r in np.flatnonzero(term == 1):
        text = tok.decode(ids[r, plen:])
        assert " wait " in text and text.endswith(tuple(f"answer {a}" for a in range(7)))
        # The trajectory follows the plain prompt (no synthesis prompt in context) ...
        p = r // (N + M)
        assert (ids[r, :plen] == np.asarray(prompts["prompt_ids"])[p]).all()
        # ... and starts with one of its prompt's wrong rollouts, token for token, up to "wait".
        prefix = ids[r, plen:plen + list(ids[r, plen:]).index(tok.vocab.index("wait"))]
        wrong_rows = rollouts[p * N + 3:(p + 1) * N, plen:]
        assert any((w[:len(prefix)] == prefix).all() for w in wrong_rows)
        assert loss_mask[r, plen:].sum() == (ids[r, plen:] != tok.pad_id).sum()
    # Decoupled advantages: G_orig's are GRPO's alone; G_ref's are normalised within G_ref.
    adv = np.asarray(batch["advantages"])
    right = np.array([[True] * 3 + [False] * 3] * P)
    np.testing.assert_allclose(adv[term == 0], grpo.advantages(cfg, right).reshape(-1), rtol=1e-6)
    ref = adv[term == 1]
    assert abs(ref.sum()) < 1e-5 and ref.min() < 0 < ref.max()  # one spoiled construction
    assert metrics["construction_correct_rate"] == (P * M - 1.0, P * M)
    # OTS: clip(exp(log p + H)) on constructed tokens only; 1 on the rollouts.
    w, constructed = np.asarray(batch["weights"]), loss_mask & (term == 1)[:, None]
    assert ((w[constructed] >= 0.01) & (w[constructed] <= 10.0)).all()
    assert (w[loss_mask & (term == 0)[:, None]] == 1.0).all()
    assert np.isfinite(np.asarray(batch["old_logp"])).all()


def test_unparsable_constructions_are_dropped_and_counted(setup, monkeypatch):
    cfg, plan, problems, prompts, student, frozen = setup
    tok = synthetic.SyntheticTokenizer(construction_words=True)
    _script(monkeypatch, cfg, problems, tok, garble_second=True)
    batch, metrics, _ = tapo.prepare(cfg, student, prompts, jax.random.key(0), frozen, {})
    assert metrics["constructions_attempted"] == (4.0, 1) and metrics["constructions_kept"] == (3.0, 1)
    assert metrics["construction_drop_missing_analysis"] == (1.0, 1)
    assert (np.asarray(batch["term"]) == -1).sum() == 1  # the empty slot is padding
    assert not np.asarray(batch["loss_mask"])[np.asarray(batch["term"]) == -1].any()


def test_rl_update_is_finite_and_moves_probability_toward_right_rollouts(setup, monkeypatch):
    cfg, plan, problems, prompts, student, frozen = setup
    tok = synthetic.SyntheticTokenizer(construction_words=True)
    _script(monkeypatch, cfg, problems, tok)
    batch, _, _ = tapo.prepare(cfg, student, prompts, jax.random.key(0), frozen, {})
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    tx = make_optimizer(cfg.optim, cfg.steps)
    graphdef, state, shardings = create_train_state(student, tx, mesh, seed=0)
    loss_fn, normalize = build_objective(cfg, graphdef, batch["ids"].shape[1])
    step = TrainStep(loss_fn, tx, lr_schedule(cfg.optim, cfg.steps), shardings, mesh, normalize=normalize)
    fixed = {k: np.asarray(v) for k, v in batch.items()}
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(4):  # the same batch and old log-probs: the surrogate must go down
            state, out = step(state, fixed, frozen.teacher_head)
            losses.append(float(out["loss"]))
            assert np.isfinite(losses[-1]) and float(out["skipped"]) == 0
        from flax import nnx
        from topd_jax.algorithms.scoring import score_tokens
        after = np.asarray(score_tokens(nnx.merge(graphdef, state.params), fixed["ids"], fixed["seq_mask"],
                                        fixed["loss_mask"]))
    assert losses[-1] < losses[0]
    gain = (after - fixed["old_logp"]).sum(1) / np.maximum(fixed["loss_mask"].sum(1), 1)
    adv, term = fixed["advantages"], fixed["term"]
    assert gain[(term == 0) & (adv > 0)].mean() > gain[(term == 0) & (adv < 0)].mean()


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_rl_normalizers_are_each_terms_token_or_row_count(aggregation):
    """The counts that divide G_orig's and G_ref's sums (losses.aggregate's): tokens, or
    non-empty rows, of each term; padding rows (term -1) count in neither."""
    rng = np.random.default_rng(0)
    mask = rng.random((7, 9)) < 0.6
    mask[3] = False  # an empty row
    term = np.array([0, 0, 1, 0, 1, -1, 1])
    norm = np.asarray(add_rl_normalizers(RlSpec(aggregation=aggregation, ref_weight=0.5),
                                         {"loss_mask": jnp.asarray(mask), "term": jnp.asarray(term)})["rl_norm"])
    per_row = mask.sum(1) if aggregation == "token_mean" else mask.any(1)
    want = [per_row[term == 0].sum(), per_row[term == 1].sum()]
    assert norm.shape == (7, 2) and (norm == np.asarray(want, np.float32)[None]).all()


def test_two_updates_per_batch_equal_two_steps_on_the_halves(setup, monkeypatch):
    cfg, plan, problems, prompts, student, frozen = setup
    tok = synthetic.SyntheticTokenizer(construction_words=True)
    _script(monkeypatch, cfg, problems, tok)
    batch, _, _ = tapo.prepare(cfg, student, prompts, jax.random.key(0), frozen, {})
    batch = {k: np.asarray(v) for k, v in batch.items()}
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    tx = make_optimizer(cfg.optim, cfg.steps)
    results = []
    for updates in (1, 2):
        graphdef, state, shardings = create_train_state(student, tx, mesh, seed=0)
        loss_fn, normalize = build_objective(cfg, graphdef, batch["ids"].shape[1])
        step = TrainStep(loss_fn, tx, lr_schedule(cfg.optim, cfg.steps), shardings, mesh, normalize=normalize,
                         updates=updates)
        with jax.set_mesh(mesh):
            if updates == 1:
                half = len(batch["ids"]) // 2
                for part in (slice(0, half), slice(half, None)):
                    state, _ = step(state, {k: v[part] for k, v in batch.items()}, frozen.teacher_head)
            else:
                state, out = step(state, batch, frozen.teacher_head)
                assert int(state.step) == 1 and int(state.opt_steps) == 2
        results.append(jax.tree.leaves(jax.device_get(state.params)))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_rl_config_errors_name_the_key():
    from topd_jax.config.schema import ConfigError
    with pytest.raises(ConfigError, match="tapo.n_pos"):
        _cfg("tapo", "tapo.n_pos=4", "tapo.n_neg=4")
    with pytest.raises(ConfigError, match="grpo.updates_per_batch"):
        _cfg("grpo", "grpo.updates_per_batch=5")
    assert _cfg("grpo", "grpo.updates_per_batch=3").grpo.updates_per_batch == 3  # 12 rows
    with pytest.raises(ConfigError, match=r"16 rows .*tapo.m_max"):  # TAPO: 2 x (6 + 2) rows
        _cfg("tapo", "grpo.updates_per_batch=3")
    with pytest.raises(ConfigError, match="rollout.n"):
        _cfg("grpo", "rollout.n=1", "tapo.n_pos=1", "tapo.n_neg=1")


@pytest.mark.parametrize("algorithm", ["grpo", "tapo"])
def test_train_runs_grpo_and_tapo_end_to_end(algorithm, tmp_path):
    """The real loop, sampler and (unscripted) random policy; a verifier that accepts half of
    all texts gives mixed rewards. TAPO's constructions fail to parse here (the policy is
    random), so its padded G_ref slots are exercised empty."""
    from topd_jax.train.loop import train
    cfg = _cfg(algorithm, "steps=2", f"output_dir={tmp_path}", "logging.progress_bar=false",
               "logging.tensorboard=false", "checkpoint.export_hf=false", "grpo.updates_per_batch=2",
               "eval.at_end=true", "eval.num_prompts=4", "eval.max_new_tokens=12")
    plan = plan_run(cfg)
    plan.text.verify = lambda text, gold: len(text.split()) % 2 == 0
    result = train(cfg, plan=plan)
    assert [r["step"] for r in result.history] == [1.0, 2.0]
    for row in result.history:
        assert np.isfinite(row["loss"]) and row["skipped"] == 0
        assert 0 < row["reward"] < 1 and row["grad_norm"] > 0
    if algorithm == "tapo":
        assert "dcs_pass_fraction" in result.history[0]
    assert int(result.state.opt_steps) == 4  # two updates per batch
    reflection = result.extras["eval_reflection"][2]  # the final eval, with TAPO's rates
    assert reflection.total == 4 and 0.0 <= result.evals[2] <= 1.0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_reflection_rate" in m for m in metrics)


@pytest.mark.parametrize("name", ["tapo_qwen3_8b", "grpo_qwen3_8b", "tapo_qwen3_8b_cold_start"])
def test_paper_rl_configs_load_and_divide_their_rows(name):
    from pathlib import Path

    from topd_jax.config.loader import load_config
    cfg = load_config(str(Path(__file__).parent.parent / "configs" / f"{name}.yaml"), [])
    assert cfg.student.preset == "qwen3-8b" and not cfg.needs_teacher
    if cfg.is_rl:
        assert (cfg.rollout.n, cfg.tapo.n_pos, cfg.tapo.n_neg, cfg.tapo.m_max) == (8, 2, 4, 4)
        per_prompt = cfg.rollout.n + (cfg.tapo.m_max if cfg.algorithm == "tapo" else 0)
        rows = cfg.data.prompts_per_step * per_prompt
        assert rows % (cfg.grpo.updates_per_batch * cfg.optim.micro_batches) == 0


def test_kl_reference_is_the_initial_student(tmp_path):
    """grpo.kl_coef > 0 loads the reference from the student's own spec and seed: at the first
    step policy == reference, so the k3 KL is 0; after an update it is positive."""
    from topd_jax.train.loop import train
    cfg = _cfg("grpo", "steps=2", f"output_dir={tmp_path}", "logging.progress_bar=false",
               "logging.tensorboard=false", "checkpoint.export_hf=false", "grpo.kl_coef=0.1")
    plan = plan_run(cfg)
    assert plan.teacher is not None and plan.teacher.config == plan.student.config
    assert plan.teacher.seed == plan.student.seed
    plan.text.verify = lambda text, gold: len(text.split()) % 2 == 0
    history = train(cfg, plan=plan).history
    assert abs(history[0]["ref_kl"]) < 1e-6
    assert history[1]["ref_kl"] > 1e-6
