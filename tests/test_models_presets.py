"""Presets at the real sizes, checked with jax.eval_shape (nothing allocated), and config I/O."""

import jax
import pytest
from flax import nnx

from topd_jax.models import PRESETS, ModelConfig, Qwen

# Published parameter counts (model cards; tied embeddings counted once), and the
# benchmark models of bench/WORKLOADS.md.
PUBLISHED = {
    "qwen3-0.6b": 0.596e9, "qwen3-1.7b": 1.72e9, "qwen3-4b": 4.02e9, "qwen3-4b-instruct-2507": 4.02e9,
    "qwen3-8b": 8.19e9, "qwen3-14b": 14.8e9, "qwen3-32b": 32.8e9,
    "qwen3-30b-a3b": 30.5e9, "qwen3-30b-a3b-instruct-2507": 30.5e9,  # MoE totals (tests/test_models_moe.py)
    "qwen2.5-0.5b": 0.494e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-3b": 3.09e9, "qwen2.5-7b": 7.62e9,
    "qwen2.5-math-1.5b": 1.54e9, "qwen2.5-math-7b": 7.62e9,
    "deepseek-r1-distill-qwen-1.5b": 1.78e9, "deepseek-r1-distill-qwen-7b": 7.62e9,
    "tiny-student": 42.0e6, "tiny-teacher": 96.7e6,
}


def test_every_preset_has_a_published_size():
    assert sorted(PRESETS) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_published_size(name):
    count = ModelConfig.preset(name).num_params()
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.005, f"{name}: {count:,}"


# eval_shape traces every layer (1-4 s each on CPU-2), so a representative subset.
@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen3-4b", "qwen3-8b", "qwen2.5-7b", "deepseek-r1-distill-qwen-1.5b"])
def test_eval_shape_of_the_real_model_matches_the_count(name):
    cfg = ModelConfig.preset(name)
    abstract = nnx.eval_shape(lambda: Qwen(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
    assert sum(x.size for x in leaves) == cfg.num_params()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    cfg = PRESETS[name]
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_hf_config_is_accepted_by_transformers():
    import transformers  # a dependency
    for name in ("qwen3-4b", "qwen2.5-7b"):
        hf = PRESETS[name].to_hf_config()
        config = transformers.AutoConfig.for_model(**hf)
        assert config.num_hidden_layers == PRESETS[name].num_layers
        assert config.rope_parameters["rope_theta"] == PRESETS[name].rope_theta


def test_preset_overrides_and_unknown_names():
    cfg = ModelConfig.preset("qwen3-8b", dtype="bfloat16", remat="full")
    assert cfg.dtype == "bfloat16" and cfg.remat == "full" and cfg.num_layers == 36
    with pytest.raises(KeyError, match="qwen3-4b"):
        ModelConfig.preset("qwen3-5b")


def test_invalid_config_values_are_named():
    base = dict(vocab_size=8, hidden_size=8, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=2,
                intermediate_size=8)
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        ModelConfig(**{**base, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="remat='everything'"):
        ModelConfig(**base, remat="everything")
    with pytest.raises(ValueError, match="dtype='float8'"):
        ModelConfig(**base, dtype="float8")


def test_unsupported_hf_configs_are_refused_by_name():
    hf = PRESETS["qwen2.5-7b"].to_hf_config()
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf_config({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}})
    with pytest.raises(ValueError, match="sliding"):
        ModelConfig.from_hf_config({**hf, "use_sliding_window": True})
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        ModelConfig.from_hf_config({**hf, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
