"""Demo model preparation: cached HF directories keyed by the fields that matter."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from topd_jax.checkpoints import load_pretrained
from topd_jax.models import init_model
from topd_jax.demos import demo
from topd_jax.config.loader import load_config

DEMO_YAML = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TINY = ["{r}.hidden_size=32", "{r}.num_layers=1", "{r}.num_heads=2", "{r}.num_kv_heads=1",
        "{r}.head_dim=16", "{r}.intermediate_size=64"]


def tiny_cfg(cache_dir, *extra):
    sizes = [t.format(r=r) for r in ("teacher", "student") for t in TINY]
    return load_config(DEMO_YAML, sizes + [
        f"demo.cache_dir={cache_dir}", "demo.teacher_steps=3", "demo.student_steps=2",
        "demo.batch_size=4", "data.synthetic.num_train=32", "data.synthetic.num_eval=4",
        *extra])


def test_prepare_trains_once_then_reuses_the_cache(tmp_path):
    cfg, logs = tiny_cfg(tmp_path), []
    student_dir, teacher_dir = demo.prepare_demo_models(cfg, progress=False, log=logs.append)
    assert sum(line.startswith("demo: training") for line in logs) == 2, logs
    for d in (student_dir, teacher_dir):
        meta = json.loads((tmp_path / d.split("/")[-1] / demo.META_FILE).read_text())
        assert 0.0 <= meta["greedy_accuracy"] <= 1.0 and meta["num_eval"] == 4
    assert json.loads((tmp_path / teacher_dir.split("/")[-1] / "config.json").read_text())[
        "hidden_size"] == 32

    logs.clear()
    again = demo.prepare_demo_models(cfg, progress=False, log=logs.append)
    assert again == (student_dir, teacher_dir)
    assert len(logs) == 2 and all(line.startswith("demo: reusing") for line in logs)
    # no temporary directories left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [student_dir.split("/")[-1], teacher_dir.split("/")[-1]])


def test_student_change_retrains_only_the_student(tmp_path):
    base = tiny_cfg(tmp_path)
    changed = tiny_cfg(tmp_path, "demo.student_noise=0.5")
    assert demo.cache_dir_for(base, "teacher") == demo.cache_dir_for(changed, "teacher")
    assert demo.cache_dir_for(base, "student") != demo.cache_dir_for(changed, "student")
    # any teacher size or task change moves both
    harder = tiny_cfg(tmp_path, "data.synthetic.modulus=11")
    assert demo.cache_dir_for(base, "teacher") != demo.cache_dir_for(harder, "teacher")
    assert demo.cache_dir_for(base, "student") != demo.cache_dir_for(harder, "student")
    # where the cache lives and the run seed do not matter
    moved = tiny_cfg(tmp_path / "elsewhere", "seed=7")
    assert demo.cache_dir_for(base, "teacher").name == demo.cache_dir_for(moved, "teacher").name


def test_saved_models_reload_with_the_trained_weights(tmp_path):
    cfg = tiny_cfg(tmp_path, "demo.student_steps=0")
    student_dir, _ = demo.prepare_demo_models(cfg, progress=False, log=lambda _: None)
    # zero warm-up steps: the student is its random init, saved and reloaded exactly
    want = init_model(demo.model_config(cfg.student), seed=cfg.data.synthetic.seed + 1)
    got = load_pretrained(student_dir)
    for a, b in zip(jax.tree.leaves(nnx.state(want)), jax.tree.leaves(nnx.state(got))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prepare_refuses_a_non_synthetic_run():
    cfg = load_config(DEMO_YAML, ["data.source=files",
                                            "data.train_files=[../shared/data/x.jsonl]"])
    with pytest.raises(ValueError, match="synthetic"):
        demo.prepare_demo_models(cfg, progress=False)
