"""Tiny run configs for the trainer tests (random-weight models, the synthetic task)."""

from __future__ import annotations

from topd_jax.config.loader import load_config

TINY = [
    "data.source=synthetic", "data.template=plain", "data.prompts_per_step=2", "data.max_prompt_len=20",
    "data.synthetic.num_train=64", "data.synthetic.num_eval=4", "data.synthetic.min_steps=1",
    "data.synthetic.max_steps=2", "data.synthetic.modulus=7",
    "rollout.n=2", "rollout.max_new_tokens=10", "warmup.max_new_tokens=10",
    "topd.window=4", "topd.num_candidates=2", "topd.min_separation=2", "topd.margin_samples=2",
    "topd.sinkhorn_iters=50",
    "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_fraction=0",
    "mesh.data=-1", "checkpoint.every=2", "checkpoint.keep=3", "checkpoint.async_save=false",
    "checkpoint.export_hf=false", "logging.progress_bar=false", "logging.stdout=false",
    "logging.tensorboard=false", "eval.at_start=false", "eval.at_end=false", "eval.max_new_tokens=10",
    "eval.temperature=0",
    "logging.label_metrics=false",  # the label-metric pass is tested in test_label_metrics.py only (CI time)
]
for role, hidden, layers in (("student", 16, 1), ("teacher", 24, 1)):
    TINY += [f"{role}.vocab_size=128", f"{role}.hidden_size={hidden}", f"{role}.num_layers={layers}",
             f"{role}.num_heads=2", f"{role}.num_kv_heads=1", f"{role}.head_dim=8",
             f"{role}.intermediate_size=32", f"{role}.max_position_embeddings=64"]


def tiny_config(out_dir, *overrides: str, steps: int = 4):
    """A validated RunConfig writing to ``out_dir``; later overrides win."""
    return load_config(None, TINY + [f"steps={steps}", f"output_dir={out_dir}", *overrides])


def tiny_model_dirs(root, cfg):
    """Save the tiny random student/teacher of ``cfg`` as HF directories; returns the paths."""
    from topd_jax.checkpoints import save_hf
    from topd_jax.models import ModelConfig, init_model
    dirs = []
    for i, spec in enumerate((cfg.student, cfg.teacher)):
        d = f"{root}/{'student' if i == 0 else 'teacher'}_hf"
        save_hf(init_model(ModelConfig(**spec.arch_overrides()), seed=i), d)
        dirs.append(d)
    return dirs


def cli_config_file(path, cfg, student_dir, teacher_dir, **top):
    """A YAML run config for ``python -m topd_jax.train --config``: ``cfg`` with the models
    given as directories (no architecture fields)."""
    import yaml

    from topd_jax.config.loader import to_dict
    d = to_dict(cfg)
    d["student"], d["teacher"] = {"path": str(student_dir)}, {"path": str(teacher_dir)}
    d.update(top)
    with open(path, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)
    return path


SMALL = dict(num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=32, rope_theta=1e4)


def tiny_pair_and_prompts():
    """``(one-device mesh, student, teacher, prompts)``: random models matching ``TINY``'s
    vocabulary and a 2-row prompt batch (row 1 left-padded), for step-level tests."""
    import jax
    import numpy as np

    from topd_jax.models import ModelConfig, init_model
    from topd_jax.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=1, fsdp=1), devices=jax.devices()[:1])  # one device: fast compiles
    s = init_model(ModelConfig(vocab_size=128, hidden_size=16, num_layers=1, **SMALL), seed=0)
    t = init_model(ModelConfig(vocab_size=128, hidden_size=24, num_layers=1, **SMALL), seed=1)
    ids = np.random.default_rng(0).integers(3, 128, (2, 6)).astype(np.int32)
    mask = np.ones((2, 6), bool)
    mask[1, :2] = False
    return mesh, s, t, {"prompt_ids": ids, "prompt_mask": mask}
