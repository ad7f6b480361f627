"""The GRPO/TAPO demo: cold-start data, its cache, the tapo_demo config, the command end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from topd_jax.algorithms.tapo_construct import Failure, parse_construction, splice_text
from topd_jax.data import synthetic
from topd_jax.demos import demo, rl_demo
from topd_jax.config.loader import load_config
from topd_jax.demos.rl_demo import TOKENIZER

TAPO_DEMO = "configs/tapo_demo.yaml"
SYNTH_RE = re.compile(r"fix (.*? \? [a-h]) ; (.*? answer \d+) ; (.*)")


def _cfg(*overrides: str, config: str | None = TAPO_DEMO):
    return load_config(config, list(overrides))


def _problems(n=64, max_steps=3):
    return synthetic.generate_problems(n, 7, min_steps=2, max_steps=max_steps)


def _rows(batch, column_range):
    """Decoded text of each row's real tokens within the columns."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return [TOKENIZER.decode(ids[i, column_range][mask[i, column_range]]) for i in range(len(ids))]


def test_cold_start_batch_mixes_constructions_and_solutions_two_to_one():
    cfg = _cfg()
    plen, clen = rl_demo.synthesis_prompt_len(cfg), rl_demo.construction_len(cfg)
    problems = _problems()
    by_prompt = {p.prompt: p for p in problems}
    batch = next(rl_demo.cold_start_batches(problems, 30, 0, slip_prob=0.0, construction_fraction=1 / 3,
                                            prompt_len=plen, completion_len=clen))
    assert batch["input_ids"].shape == (30, plen + clen)
    prompts, targets = _rows(batch, slice(0, plen)), _rows(batch, slice(plen, None))
    kinds = [p.startswith("fix ") for p in prompts]
    assert kinds == [True] * 10 + [False] * 20
    encode = lambda s: TOKENIZER.encode(s, add_bos=False)  # noqa: E731
    for prompt, target, is_construction in zip(prompts, targets, kinds):
        if not is_construction:  # slip_prob 0: every solution is right, in the plain prompt's context
            assert synthetic.check(target, by_prompt[prompt].answer) and "wait" not in target
            continue
        problem_text, wrong, right = SYNTH_RE.match(prompt).groups()
        problem = by_prompt[problem_text]
        assert not synthetic.check(wrong, problem.answer) and synthetic.check(right, problem.answer)
        parsed = parse_construction(target)
        assert not isinstance(parsed, Failure)
        # The reconstruction keeps the wrong solution through its first wrong line, token for token.
        sp = splice_text(encode(wrong), parsed.reconstruction, decode=TOKENIZER.decode, encode=encode)
        assert not isinstance(sp, Failure)
        head = TOKENIZER.decode(sp.ids[:sp.prefix_len]).split()
        assert synthetic.first_error(problem, " ".join(head)) == synthetic.first_error(problem, wrong)
        assert TOKENIZER.decode(sp.ids[sp.prefix_len:]).split()[0] == "wait"
        assert synthetic.check(TOKENIZER.decode(sp.ids), problem.answer)
    # Loss only on the targets (and their eos).
    assert not batch["loss_mask"][:, :plen].any()
    assert (batch["loss_mask"].sum(1) == [len(t.split()) + 1 for t in targets]).all()


def test_solution_examples_slip_at_the_configured_rate():
    rng, problems = np.random.default_rng(0), _problems(200)
    right = [synthetic.check(rl_demo.solution_example(p, rng, 0.3)[1], p.answer) for p in problems]
    assert 0.6 < np.mean(right) < 0.8


@pytest.mark.parametrize("max_steps", [3, 4])
def test_length_bounds_are_tight(max_steps):
    cfg = _cfg(f"data.synthetic.max_steps={max_steps}")
    rng, longest = np.random.default_rng(1), [0, 0]
    for p in _problems(300, max_steps):
        prompt, target, _ = rl_demo.construction_example(p, rng)
        longest = [max(longest[0], len(TOKENIZER.encode(prompt))),
                   max(longest[1], len(TOKENIZER.encode(target, add_bos=False)) + 1)]
    assert longest == [rl_demo.synthesis_prompt_len(cfg), rl_demo.construction_len(cfg)]


def test_cache_key_changes_with_the_recipe_fields_only():
    base = rl_demo.cache_dir_for(_cfg())
    for changed in ("cold_start.steps=7", "cold_start.construction_fraction=0.5", "demo.student_noise=0.1",
                    "demo.lr=0.02", "demo.batch_size=16", "student.hidden_size=32", "data.synthetic.seed=5"):
        assert rl_demo.cache_dir_for(_cfg(changed)) != base, changed
    for same in ("seed=3", "steps=7", "algorithm=grpo", "optim.lr=0.1", "demo.teacher_steps=1",
                 "demo.student_steps=1", "tapo.m_max=2", "output_dir=/tmp/x"):
        assert rl_demo.cache_dir_for(_cfg(same)) == base, same
    assert rl_demo.cache_dir_for(_cfg("demo.cache_dir=/tmp/elsewhere")).name == base.name
    assert base.name.startswith("cold_start-")


def test_tapo_demo_config_validates_for_both_algorithms():
    from topd_jax.train.setup import plan_run
    for algorithm in ("tapo", "grpo"):
        cfg = _cfg(f"algorithm={algorithm}")
        assert cfg.is_rl and cfg.rollout.n == 8 and cfg.data.source == "synthetic"
        assert (cfg.tapo.n_pos, cfg.tapo.n_neg, cfg.tapo.m_max) == (2, 4, 4)
        rl_demo._check_positions(cfg)
        plan = plan_run(cfg)
        assert plan.teacher is None and plan.student.config.vocab_size == TOKENIZER.vocab_size == 128
    # Room for a constructed trajectory and for a construction reply after its prompt.
    assert cfg.rollout.max_new_tokens >= rl_demo.trajectory_len(cfg)
    assert cfg.tapo.max_new_tokens >= rl_demo.construction_len(cfg)
    assert cfg.tapo.max_synthesis_prompt_len >= rl_demo.synthesis_prompt_len(cfg)
    assert cfg.student.max_position_embeddings >= cfg.tapo.max_synthesis_prompt_len + cfg.tapo.max_new_tokens


def test_reflection_stats_split_accuracy_by_the_correction_word():
    texts = ["b = 1 ; answer 1", "b = 2 wait b = 1 ; answer 1", "b = 2 wait b = 3 ; answer 3", "b = 5 ; answer 5"]
    s = rl_demo.reflection_stats(texts, [True, True, False, False])
    assert s == {"accuracy": 0.5, "reflective_fraction": 0.5, "direct_solution_rate": 0.5,
                 "effective_reflection_rate": 0.5, "num": 4}
    s = rl_demo.reflection_stats(texts[:1], [True])
    assert s["effective_reflection_rate"] is None and s["direct_solution_rate"] == 1.0
    assert rl_demo.reflection_stats(["awaiting answer 1"], [True])["reflective_fraction"] == 0.0


def test_training_stats_total_constructions_over_steps():
    history = [{"reward": 0.5, "constructions_attempted": 4.0, "constructions_parsed": 3.0, "constructions_kept": 2.0,
                "constructions_correct": 1.0, "prefix_match_len": 10.0, "dcs_pass_fraction": 0.5, "ots_weight": 0.9},
               {"reward": 0.7, "constructions_attempted": 0.0, "constructions_parsed": 0.0, "constructions_kept": 0.0,
                "constructions_correct": 0.0, "dcs_pass_fraction": 0.0},
               {"reward": 0.9, "constructions_attempted": 4.0, "constructions_parsed": 4.0, "constructions_kept": 4.0,
                "constructions_correct": 4.0, "prefix_match_len": 4.0, "dcs_pass_fraction": 1.0, "ots_weight": 0.7}]
    t = rl_demo.training_stats(history)
    assert t["constructions_attempted"] == 8 and t["construction_parse_rate"] == 7 / 8
    assert t["construction_kept_rate"] == 6 / 8 and t["construction_correct_rate"] == 5 / 6
    assert t["prefix_match_len"] == pytest.approx((2 * 10 + 4 * 4) / 6)  # weighted by kept
    assert t["dcs_pass_fraction"] == pytest.approx(0.5) and t["ots_weight"] == pytest.approx(0.8)
    grpo = rl_demo.training_stats([{"reward": 0.5}])
    assert grpo["constructions_attempted"] is None and grpo["construction_parse_rate"] is None


TINY = ["student.hidden_size=16", "student.num_layers=1", "student.num_heads=2", "student.num_kv_heads=1",
        "student.head_dim=8", "student.intermediate_size=32", "data.synthetic.num_train=64",
        "data.synthetic.num_eval=8", "data.prompts_per_step=2", "eval.num_prompts=8", "eval.every=0",
        "cold_start.steps=3", "demo.batch_size=6", "logging.progress_bar=false", "logging.stdout=false",
        "checkpoint.async_save=false"]


def test_command_prepares_the_cold_start_then_runs_tapo_and_reports(tmp_path, capsys):
    from topd_jax.train.__main__ import main
    args = ["--config", TAPO_DEMO, *TINY, "steps=2", f"output_dir={tmp_path}/run",
            f"demo.cache_dir={tmp_path}/cache"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    cache = list((tmp_path / "cache").iterdir())
    assert [d.name[:11] for d in cache] == ["cold_start-"]  # no temp dirs left behind
    meta = demo.read_meta(cache[0])
    assert meta["steps"] == 3 and meta["construction_examples"] == 3 * 2 and meta["solution_examples"] == 3 * 4
    for stats in meta["construction"].values():
        assert 0 <= stats["correct_rate"] <= stats["kept_rate"] <= stats["parse_rate"] <= 1
    report = json.loads((tmp_path / "run" / rl_demo.REPORT_JSON).read_text())
    assert report["algorithm"] == "tapo" and report["steps"] == 2
    assert [s for s, _ in report["eval_curve"]] == [0, 2]
    assert report["training"]["dcs_pass_fraction"] is not None  # TAPO's metrics were logged
    assert report["final"]["greedy"]["num"] == 8 and report["cold_start"]["greedy_accuracy"] == meta["greedy_accuracy"]
    # The report table is the command's output; progress messages are log lines on stderr.
    assert "greedy accuracy before -> after" in out and "rl demo: cold start" in err
    # Same recipe: the cached cold start is reused (no second training).
    logs = []
    assert rl_demo.prepare_cold_start(_cfg(*TINY, f"demo.cache_dir={tmp_path}/cache", "algorithm=grpo"),
                                      log=logs.append) == str(cache[0])
    assert logs and logs[0].startswith("rl demo: reusing cached cold start")


def test_command_rejects_too_few_positions_before_training(tmp_path, capsys):
    from topd_jax.train.__main__ import main
    args = ["--config", TAPO_DEMO, *TINY, "student.max_position_embeddings=64", f"output_dir={tmp_path}/run",
            f"demo.cache_dir={tmp_path}/cache"]
    assert main(args) == 2
    assert "student.max_position_embeddings=64 < 122" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
