"""Run config: TOPD.md defaults, YAML + overrides typed parsing, clear errors, --help."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from topd_jax.config.schema import ConfigError, ModelSpec, RunConfig
from topd_jax.config.loader import (format_help, from_dict, leaf_keys, load_config,
                                          parse_cli, to_dict)

ROOT = Path(__file__).resolve().parents[1]
BASE = ["student.preset=tiny", "teacher.preset=tiny", "data.source=synthetic"]


def _load(*overrides, data=None, tmp_path=None):
    if data is None:
        return load_config(None, list(BASE) + list(overrides))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return load_config(path, list(overrides))


def test_defaults_are_the_ones_named_in_topd_md():
    cfg = _load()
    t, o, r = cfg.topd, cfg.optim, cfg.rollout
    assert cfg.algorithm == "opd" and cfg.loss.divergence == "reverse_kl"
    assert cfg.loss.estimator == "full_vocab" and cfg.loss.kd_temperature == 1.0
    assert (t.candidate_mode, t.num_candidates, t.min_separation, t.candidate_quantile) == \
        ("top_c", 3, 8, 0.8)
    assert (t.detector, t.window, t.rollback, t.sinkhorn_epsilon, t.margin_samples) == \
        ("ot_embedding", 50, 1, 0.05, 4)
    assert (t.false_alarm_quantile, t.suppression_weight, t.max_guided_points) == (0.3, 0.0, 1)
    assert (t.guidance, t.guidance_weight, t.guidance_decay, t.guidance_target) == \
        (True, 1.0, 1.0, "teacher_kl")
    assert t.reuse_student_suffix is False and t.continuations_per_side == 1
    assert (r.n, r.temperature, r.top_p) == (4, 1.0, 1.0)
    assert (o.b1, o.b2, o.weight_decay, o.clip_norm, o.warmup_fraction, o.min_lr) == \
        (0.9, 0.98, 0.0, 1.0, 0.05, 1e-8)
    assert cfg.warmup.ce_weight == 0.5 and (cfg.warmup.temperature, cfg.warmup.top_p) == (0.6, 0.95)


def test_suppression_default_resolves_per_algorithm():
    assert _load().suppression == "none" and not _load().uses_detector
    assert _load("algorithm=topd").suppression == "false_alarms"
    opd_s = _load("topd.suppression=false_alarms")
    assert opd_s.suppression == "false_alarms" and opd_s.uses_detector and not opd_s.uses_guidance
    assert _load("algorithm=topd").uses_guidance
    assert not _load("algorithm=topd", "topd.guidance=false").uses_guidance


def test_cli_values_are_parsed_by_field_type():
    cfg = _load("topd.guidance=False", "topd.window=12", "optim.lr=3e-4", "rollout.top_k=none",
                "topd.max_guided_points=null", "optim.clip_norm=None", "seed=7",
                "data.train_files=[a.jsonl, b.parquet]", "eval.num_prompts=5",
                "topd.detector=kl_window", "student.qk_norm=yes")
    assert cfg.topd.guidance is False and cfg.topd.window == 12 and cfg.optim.lr == 3e-4
    assert cfg.rollout.top_k is None and cfg.topd.max_guided_points is None
    assert cfg.optim.clip_norm is None and cfg.seed == 7 and cfg.eval.num_prompts == 5
    assert cfg.data.train_files == ("a.jsonl", "b.parquet")
    assert cfg.topd.detector == "kl_window" and cfg.student.qk_norm is True


def test_yaml_values_and_cli_overrides_combine(tmp_path):
    # "2e-6" without a dot is a *string* to PyYAML: it must still become a float.
    text = ("algorithm: topd\nsteps: 20\noptim:\n  lr: 2e-6\n  micro_batches: 2\n"
            "student: {preset: tiny}\nteacher: {path: /models/t}\n"
            "data: {source: files, train_files: [x.jsonl]}\n")
    cfg = _load("steps=30", "topd.window=8", data=text, tmp_path=tmp_path)
    assert cfg.algorithm == "topd" and cfg.steps == 30 and cfg.topd.window == 8
    assert cfg.optim.lr == pytest.approx(2e-6) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.micro_batches == 2 and cfg.data.train_files == ("x.jsonl",)
    assert cfg.teacher.path == "/models/t"


@pytest.mark.parametrize("override, nearest", [
    ("topd.windw=3", "topd.window"), ("optm.lr=1", "optim.lr"), ("window=3", "topd.window"),
    ("rollout.temprature=0.5", "rollout.temperature")])
def test_unknown_cli_key_names_key_and_nearest(override, nearest):
    with pytest.raises(ConfigError) as e:
        _load(override)
    key = override.split("=")[0]
    assert e.value.key == key and f"'{nearest}'" in str(e.value)


def test_unknown_yaml_key_names_full_path_and_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"'topd.sinkhorn_eps'.*'topd.sinkhorn_epsilon'"):
        _load(data={"student": {"preset": "a"}, "teacher": {"preset": "b"},
                    "data": {"source": "synthetic"}, "topd": {"sinkhorn_eps": 0.1}},
              tmp_path=tmp_path)


@pytest.mark.parametrize("override, fragment", [
    ("topd.false_alarm_quantile=1.5", "must be in [0, 1], got 1.5"),
    ("topd.window=0", "must be > 0, got 0"),
    ("topd.window=ten", "expected int, got 'ten'"),
    ("optim.lr=fast", "expected float, got 'fast'"),
    ("topd.guidance=maybe", "expected bool, got 'maybe'"),
    ("algorithm=ppo", "'ppo' is not one of opd, topd, warmup"),
    ("optim.b2=1.0", "must be in (0, 1), got 1.0"),
    ("rollout.top_p=0", "must be in (0, 1], got 0.0"),
    ("mesh.data=0", "must be >= 1, or -1"),
    ("optim.min_lr=1.0", "min_lr=1.0 > lr=2e-06"),
    ("optim.micro_batches=3", "does not divide"),
    ("data.synthetic.min_steps=9", "min_steps=9 > max_steps=4"),
])
def test_bad_values_are_rejected_naming_key_and_value(override, fragment):
    with pytest.raises(ConfigError) as e:
        _load(override)
    assert fragment in str(e.value)
    key = override.split("=")[0]
    assert e.value.key in (key, "optim.micro_batches", "optim.min_lr"), str(e.value)


def test_nested_errors_carry_the_full_dotted_key():
    with pytest.raises(ConfigError) as e:
        _load("data.synthetic.num_train=-1")
    assert e.value.key == "data.synthetic.num_train" and "-1" in str(e.value)


def test_missing_model_and_missing_train_files_are_errors():
    with pytest.raises(ConfigError, match="'teacher.path': no model given"):
        load_config(None, ["student.preset=x", "data.source=synthetic"])
    with pytest.raises(ConfigError, match="'data.train_files'.*at least one file"):
        load_config(None, ["student.preset=x", "teacher.preset=y"])
    spec = ModelSpec(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, intermediate_size=64)
    assert spec.is_specified and spec.arch_overrides()["num_kv_heads"] == 2
    with pytest.raises(ConfigError, match="not a multiple"):
        ModelSpec(preset="x", num_heads=4, num_kv_heads=3)


def test_setting_a_section_or_a_malformed_override_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="'topd': is a section"):
        _load("topd=3")
    with pytest.raises(ConfigError, match="key.sub=value"):
        _load("topd.window")
    with pytest.raises(ConfigError, match="'optim': is a section"):
        _load(data={"optim": 3}, tmp_path=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_to_dict_round_trips_through_yaml():
    cfg = _load("algorithm=topd", "data.train_files=a,b", "topd.max_guided_points=none")
    again = from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


def test_help_lists_every_option_with_default_and_doc(capsys):
    text = format_help()
    for key, (_, f) in leaf_keys(RunConfig).items():
        assert f"  {key}: " in text and f.metadata["help"] in text, key
    assert "topd.window: int = 50" in text and "opd|topd|warmup" in text
    with pytest.raises(SystemExit) as e:
        parse_cli(["--help"])
    assert e.value.code == 0 and "topd.false_alarm_quantile" in capsys.readouterr().out


def test_parse_cli_reads_config_flag_and_rejects_stray_args(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"student": {"preset": "a"}, "teacher": {"preset": "b"},
                                    "data": {"source": "synthetic"}}))
    assert parse_cli(["--config", str(path), "steps=3"]).steps == 3
    assert parse_cli([f"--config={path}"]).steps == 1000
    with pytest.raises(ConfigError, match="--verbose"):
        parse_cli(["--config", str(path), "--verbose"])


def test_every_field_has_help_and_a_tuple_or_immutable_default():
    for key, (_, f) in leaf_keys(RunConfig).items():
        assert f.metadata.get("help"), key
        assert not isinstance(f.default, (list, dict)), key
    assert dataclasses.is_dataclass(RunConfig) and RunConfig.__dataclass_params__.frozen


@settings(max_examples=40, deadline=None)
@given(q=st.floats(-2, 3, allow_nan=False), w=st.integers(-5, 200))
def test_probability_and_size_checks_accept_exactly_the_valid_range(q, w):
    ok = 0 <= q <= 1 and w > 0
    try:
        cfg = _load(f"topd.false_alarm_quantile={q!r}", f"topd.window={w}")
    except ConfigError:
        assert not ok
    else:
        assert ok and cfg.topd.false_alarm_quantile == q and cfg.topd.window == w


def test_demo_config_loads():
    cfg = load_config(ROOT / "configs/demo.yaml")
    assert cfg.data.source == "synthetic" and cfg.student.is_specified


def test_model_spec_fields_are_model_config_fields():
    from topd_jax import models
    names = {f.name for f in dataclasses.fields(models.ModelConfig)}
    spec_fields = {f.name for f in dataclasses.fields(ModelSpec)} - {"path", "preset"}
    assert spec_fields <= names, spec_fields - names
    cfg = load_config(ROOT / "configs/demo.yaml")
    for spec in (cfg.student, cfg.teacher):
        mc = models.ModelConfig(**spec.arch_overrides(), dtype=spec.dtype)
        assert mc.vocab_size >= 122  # the synthetic tokenizer's ids fit
    assert models.ModelConfig.preset("tiny-student") is not None


def test_config_loader_command_prints_yaml_and_bad_keys_exit_2(capsys):
    from topd_jax.config.loader import main
    assert main(["--config", str(ROOT / "configs/demo.yaml"), "steps=7", "topd.window=16"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["steps"] == 7 and data["topd"]["window"] == 16
    assert main(["--config", str(ROOT / "configs/demo.yaml"), "topd.windw=16"]) == 2
    assert capsys.readouterr().err == "error: config key 'topd.windw': unknown key; did you mean 'topd.window'?\n"


def test_python_m_topd_jax_config_prints_the_resolved_config():
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "topd_jax.config", "--config", str(ROOT / "configs/demo.yaml"),
                          "steps=3"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert yaml.safe_load(run.stdout)["steps"] == 3
