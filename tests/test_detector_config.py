"""The detector options of issue 13 in the run config: teacher_null's requirements, the OT
solver / embedding / window-end choices, and guidance with high-divergence suppression."""

import pytest

from tests._train_tiny import tiny_config
from topd_jax.config.schema import ConfigError


def test_teacher_null_needs_ot_and_a_second_teacher_sample(tmp_path):
    cfg = tiny_config(tmp_path, "algorithm=topd", "topd.false_alarm_rule=teacher_null",
                      "topd.continuations_per_side=2")
    assert cfg.topd.false_alarm_rule == "teacher_null"
    with pytest.raises(ConfigError, match="continuations_per_side >= 2, got 1") as e:
        tiny_config(tmp_path, "algorithm=topd", "topd.false_alarm_rule=teacher_null")
    assert e.value.key == "topd.false_alarm_rule"
    with pytest.raises(ConfigError, match="detector='kl_window'"):
        tiny_config(tmp_path, "algorithm=topd", "topd.false_alarm_rule=teacher_null",
                    "topd.continuations_per_side=2", "topd.detector=kl_window")


@pytest.mark.parametrize("override", ["topd.ot_solver=sinkhorn_divergence", "topd.ot_solver=exact",
                                      "topd.ot_embedding=teacher", "topd.ot_embedding=student_initial",
                                      "topd.ot_window_end=pad_eos"])
def test_detector_choices_are_accepted(tmp_path, override):
    key, value = override.split("=")
    assert getattr(tiny_config(tmp_path, "algorithm=topd", override).topd, key.split(".")[1]) == value


def test_unknown_detector_choice_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path, "topd.ot_embedding=prompt")
    assert e.value.key == "topd.ot_embedding"


def test_guidance_with_high_divergence_suppression_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="high_divergence suppresses") as e:
        tiny_config(tmp_path, "algorithm=topd", "topd.suppression=high_divergence")
    assert e.value.key == "topd.suppression"
    # the paper's ablation arms are fine: without guidance, or on OPD
    assert not tiny_config(tmp_path, "algorithm=topd", "topd.suppression=high_divergence",
                           "topd.guidance=false").uses_guidance
    assert tiny_config(tmp_path, "algorithm=opd", "topd.suppression=high_divergence").uses_detector


def test_teacher_null_has_no_high_divergence_matched_set(tmp_path):
    with pytest.raises(ConfigError, match="no matched high-divergence set") as e:
        tiny_config(tmp_path, "algorithm=opd", "topd.suppression=high_divergence", "topd.false_alarm_rule=teacher_null",
                    "topd.continuations_per_side=2")
    assert e.value.key == "topd.false_alarm_rule"
