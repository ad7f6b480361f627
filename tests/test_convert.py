"""HF <-> native conversion: round trips, transformers reload, config styles, clear errors."""

import json
import shutil

import numpy as np
import pytest

from tests._hf_tiny import TINY, build_hf, hf_logits, jitted_forward, padded_batch, torch
from topd_jax.checkpoints import load_hf, load_pretrained, save_hf, save_native
from topd_jax.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from topd_jax.convert import main as convert


def read_all(directory) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        st = SafetensorsFile(f)
        out.update({k: st.read(k) for k in st.keys()})
    return out


def rewrite(directory, tensors: dict[str, np.ndarray]) -> None:
    """Replace the weights of `directory` by `tensors` in one model.safetensors."""
    for f in list(directory.glob("*.safetensors")) + list(directory.glob("*.index.json")):
        f.unlink()
    write_safetensors(directory / "model.safetensors", [(k, v.shape, v.dtype) for k, v in tensors.items()],
                      tensors.__getitem__)


@pytest.fixture
def hf_dir(tmp_path):
    """qwen3 with untied head, float32, saved by transformers."""
    model = build_hf("qwen3-untied-hd24")
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def test_round_trip_hf_native_hf_is_bit_identical_in_bf16_with_shards(tmp_path):
    src = tmp_path / "src"
    build_hf("qwen2-untied").to(torch.bfloat16).save_pretrained(src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").exists()  # the source really is sharded
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(eos_token_id=151645, bos_token_id=151643)
    (src / "config.json").write_text(json.dumps(cfg))

    assert convert(["hf-to-native", str(src), str(tmp_path / "native")]) == 0
    assert convert(["native-to-hf", str(tmp_path / "native"), str(tmp_path / "out"), "--max-shard-size", "30KB"]) == 0

    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = read_all(src), read_all(out)
    assert sorted(a) == sorted(b) == sorted(index["weight_map"])
    for name in a:
        assert b[name].dtype == a[name].dtype and b[name].shape == a[name].shape, name
        assert np.array_equal(a[name].view(np.uint16), b[name].view(np.uint16)), name
    written = json.loads((out / "config.json").read_text())
    assert written["eos_token_id"] == 151645 and written["dtype"] == "bfloat16"
    assert (out / "generation_config.json").exists()


def test_transformers_loads_the_export_and_gives_the_same_logits(hf_dir, tmp_path):
    src, hf = hf_dir
    ours = load_pretrained(src)
    save_hf(ours, tmp_path / "export", max_shard_size="40KB")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids, mask = padded_batch(96, [7, 4], 7, "left")
    ref = hf_logits(hf, ids, mask)
    assert np.abs(hf_logits(reloaded, ids, mask) - ref)[mask].max() == 0.0
    assert np.abs(jitted_forward(ours)(ids, mask) - ref)[mask].max() <= 1e-4


def test_tied_export_omits_the_head_and_reloads(tmp_path):
    hf = build_hf("qwen3-tied-gqa4")
    hf.save_pretrained(tmp_path / "src")
    save_hf(load_hf(tmp_path / "src"), tmp_path / "out")
    assert "lm_head.weight" not in read_all(tmp_path / "out")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = padded_batch(96, [5, 5], 5, "right")
    assert np.abs(hf_logits(reloaded, ids, mask) - hf_logits(hf, ids, mask)).max() == 0.0


def test_old_and_new_config_styles_load_the_same_model(hf_dir, tmp_path):
    src, _ = hf_dir
    cfg = json.loads((src / "config.json").read_text())
    assert "rope_parameters" in cfg  # transformers 5 writes the new style
    old = tmp_path / "old"
    shutil.copytree(src, old)
    legacy = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "dtype")}
    legacy.update(rope_theta=cfg["rope_parameters"]["rope_theta"], rope_scaling=None, torch_dtype="float32")
    (old / "config.json").write_text(json.dumps(legacy))
    assert load_hf(old).config == load_hf(src).config
    assert load_hf(old).config.rope_theta == 5e5


def test_bf16_checkpoint_loads_into_float32_params(tmp_path):
    hf = build_hf("qwen3-tied-gqa4").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    model = load_hf(tmp_path / "bf16", dtype="float32")
    emb = np.asarray(model.embedding_table())
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb, hf.model.embed_tokens.weight.detach().float().numpy())
    assert load_hf(tmp_path / "bf16", dtype="bfloat16").embed[...].dtype == "bfloat16"


def test_vocab_resize_pads_zero_rows_and_keeps_real_logits(hf_dir):
    src, _ = hf_dir
    base = load_hf(src)
    padded = load_hf(src, vocab_size=128)
    cut = load_hf(src, vocab_size=64)
    assert padded.embedding_table().shape == (128, 64) and not np.asarray(padded.embedding_table()[96:]).any()
    ids, mask = padded_batch(64, [4, 2], 4, "left")
    ref = jitted_forward(base)(ids, mask)
    np.testing.assert_allclose(jitted_forward(padded)(ids, mask)[..., :96], ref, atol=1e-6)
    np.testing.assert_allclose(jitted_forward(cut)(ids, mask), ref[..., :64], atol=1e-6)


def test_native_checkpoint_restores_into_a_mesh(hf_dir, tmp_path):
    import jax

    from topd_jax.sharding import MeshConfig, make_mesh

    src, _ = hf_dir
    model = load_hf(src)
    save_native(model, tmp_path / "native")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    restored = load_pretrained(tmp_path / "native", mesh=mesh)
    assert restored.layers[0].attn.q_proj[...].sharding.spec == jax.P("tensor", None, "fsdp")
    direct = load_pretrained(src, mesh=mesh)
    assert direct.layers[1].mlp.down_proj[...].sharding.spec == jax.P("fsdp", "tensor")
    ids, mask = padded_batch(96, [6, 3], 6, "right")
    ref = jitted_forward(model)(ids, mask)
    assert np.abs(jitted_forward(restored)(ids, mask) - ref).max() <= 1e-5
    assert np.abs(jitted_forward(direct)(ids, mask) - ref).max() <= 1e-5


# ---- errors that name the problem -------------------------------------------------------

def test_hub_id_is_refused_with_a_download_hint():
    with pytest.raises(FileNotFoundError, match=r"hub id.*never downloads"):
        load_pretrained("Qwen/Qwen3-4B")


def test_missing_config_and_missing_weights_name_the_file(hf_dir):
    src, _ = hf_dir
    (src / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_hf(src)
    (src / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf(src)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(src / "nope")


def test_unknown_architecture_names_it(hf_dir):
    src, _ = hf_dir
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"])  # shared experts: not supported
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown architecture.*qwen2_moe"):
        load_hf(src)


def test_wrong_tensor_shape_names_the_tensor_and_both_shapes(hf_dir):
    src, _ = hf_dir
    tensors = read_all(src)
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = np.zeros((40, 64), np.float32)
    rewrite(src, tensors)
    with pytest.raises(ValueError, match=rf"{name}.*\(40, 64\).*\(48, 64\)"):
        load_hf(src)


def test_missing_and_unexpected_tensors_are_listed(hf_dir):
    src, _ = hf_dir
    tensors = read_all(src)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    rewrite(src, tensors)
    with pytest.raises(ValueError, match=r"missing tensors.*up_proj.*unexpected tensors.*extra"):
        load_hf(src)


def test_vocab_padding_mismatch_is_a_shape_error(hf_dir):
    """A 152064-row checkpoint under a 151936-vocab config (scaled down: 112 vs 96 rows)."""
    src, _ = hf_dir
    tensors = read_all(src)
    tensors["model.embed_tokens.weight"] = np.zeros((112, 64), np.float32)
    rewrite(src, tensors)
    with pytest.raises(ValueError, match=r"embed_tokens.*\(112, 64\).*\(96, 64\)"):
        load_hf(src)


def test_export_refuses_a_directory_that_holds_weights(hf_dir):
    src, _ = hf_dir
    with pytest.raises(FileExistsError, match="empty directory"):
        save_hf(load_hf(src), src)


def test_cli_help_documents_both_directions(capsys):
    assert convert(["--help"]) == 0
    text = capsys.readouterr().out
    assert "hf-to-native" in text and "native-to-hf" in text


def test_cli_reports_bad_input_in_one_line_with_exit_2(tmp_path, capsys):
    assert convert(["hf-to-native", "Qwen/Qwen3-4B", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "hub id" in err and "Traceback" not in err
    assert convert(["native-to-hf", str(tmp_path / "missing"), str(tmp_path / "y")]) == 2
    assert "missing" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert convert(["hf-to-nativ", "a", "b"]) == 2  # argparse: invalid choice
    assert "invalid choice: 'hf-to-nativ'" in capsys.readouterr().err
