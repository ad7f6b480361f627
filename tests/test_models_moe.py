"""Qwen3-MoE: parity with transformers' Qwen3MoeForCausalLM, HF conversion both ways, KV-cache
decode, ragged == dense experts, expert-parallel sharding, config errors, the 30B-A3B preset."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tests._hf_tiny import TINY_MOE, build_hf_moe, hf_logits, jitted_forward, padded_batch, random_model, torch
from topd_jax.checkpoints import load_hf, save_hf
from topd_jax.checkpoints.safetensors_io import SafetensorsFile
from topd_jax.convert import main as convert
from topd_jax.models import ModelConfig, Qwen, default_positions, load_pretrained, reconfigure
from topd_jax.sharding import MeshConfig, make_mesh, shard_model

TOL = 1e-5  # float32 on both sides; measured <= 1.8e-7 (dropping the top-k renormalisation: 3e-3)
VOCAB = 96


def read_all(directory) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        st = SafetensorsFile(f)
        out.update({k: st.read(k) for k in st.keys()})
    return out


@pytest.fixture(scope="module", params=sorted(TINY_MOE))
def pair(request, tmp_path_factory):
    """(name, transformers model, its directory, our model loaded from it)."""
    hf = build_hf_moe(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path, load_pretrained(path)


# ---- parity with transformers ------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers_on_padded_batches(pair, side):
    name, hf, _, ours = pair
    ids, mask = padded_batch(VOCAB, [16, 9, 5, 1], 16, side)
    got = jitted_forward(ours)(ids, mask)
    ref = hf_logits(hf, ids, mask)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref)[mask].max() <= TOL


def test_config_and_layer_pattern_follow_transformers(pair):
    name, hf, _, ours = pair
    cfg = ours.config
    assert cfg.model_type == "qwen3_moe" and cfg.num_experts == 8
    assert cfg.norm_topk_prob == TINY_MOE[name]["norm_topk_prob"]
    hf_moe = tuple(i for i, layer in enumerate(hf.model.layers) if type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock")
    assert cfg.moe_layers == hf_moe and hf_moe and len(hf_moe) < cfg.num_layers  # both kinds present
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())  # torch lists a tied head once
    kinds = [type(layer.mlp).__name__ for layer in ours.layers]
    assert [k == "MoEBlock" for k in kinds] == [cfg.is_moe_layer(i) for i in range(cfg.num_layers)]


# ---- HF conversion ---------------------------------------------------------------------------

def test_hf_save_load_round_trip_and_transformers_reload(pair, tmp_path):
    name, hf, src, ours = pair
    save_hf(ours, tmp_path / "out", max_shard_size="40KB")
    a, b = read_all(src), read_all(tmp_path / "out")
    assert sorted(a) == sorted(b) and f"model.layers.{ours.config.moe_layers[0]}.mlp.experts.7.down_proj.weight" in b
    for k in a:
        assert np.array_equal(a[k], b[k]), k  # float32: bit-identical, expert slices included
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "qwen3_moe" and written["num_experts"] == 8
    assert load_hf(tmp_path / "out").config == ours.config
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "Qwen3MoeForCausalLM"
    ids, mask = padded_batch(VOCAB, [7, 4], 7, "left")
    assert np.abs(hf_logits(reloaded, ids, mask) - hf_logits(hf, ids, mask))[mask].max() == 0.0


def test_convert_cli_round_trip_is_bit_identical_in_bf16(tmp_path):
    src = tmp_path / "src"
    build_hf_moe("qwen3moe-norm-dense1", seed=1).to(torch.bfloat16).save_pretrained(src, max_shard_size="20KB")
    assert convert(["hf-to-native", str(src), str(tmp_path / "native")]) == 0
    assert convert(["native-to-hf", str(tmp_path / "native"), str(tmp_path / "out"), "--max-shard-size", "30KB"]) == 0
    a, b = read_all(src), read_all(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for k in a:
        assert b[k].dtype == a[k].dtype and np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)), k


def test_transformers5_config_key_num_local_experts_is_read(pair):
    _, _, src, ours = pair
    hf_cfg = json.loads((src / "config.json").read_text())
    assert hf_cfg.get("num_local_experts") == 8  # what transformers 5 writes
    hub_style = {k: v for k, v in hf_cfg.items() if k != "num_local_experts"} | {"num_experts": 8}
    assert ModelConfig.from_hf_config(hub_style) == ModelConfig.from_hf_config(hf_cfg) == ours.config


# ---- KV cache, implementations, sharding -------------------------------------------------------

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=48, rope_theta=1e4, tie_word_embeddings=False, num_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=(1,))


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, scale=0.3)  # scale 0.3: routing decisive (see build_hf_moe)


def test_token_by_token_decode_equals_full_forward(model):
    graphdef, state = nnx.split(model)
    full = jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(ids, attention_mask=mask))

    @jax.jit
    def step(s, ids, positions, mask, cache):
        m = nnx.merge(graphdef, s)
        hidden, cache = m.hidden_states(ids, positions=positions, attention_mask=mask, cache=cache)
        return m.compute_logits(hidden), cache

    ids, mask = (jnp.asarray(a) for a in padded_batch(64, [9, 6, 2], 9, "left", seed=4))
    positions = default_positions(mask)
    ref = np.asarray(full(state, ids, mask))
    logits, cache = step(state, ids[:, :4], positions[:, :4], mask[:, :4], model.init_cache(3, 12))
    got = [np.asarray(logits)]
    for t in range(4, 9):
        logits, cache = step(state, ids[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
        got.append(np.asarray(logits))
    assert int(cache.index) == 9
    assert np.abs(np.concatenate(got, axis=1) - ref)[np.asarray(mask)].max() < 1e-5


def test_ragged_and_dense_experts_agree_on_logits(model):
    dense = reconfigure(model, moe_impl="dense")
    assert model.config.moe_impl == "ragged" and dense.layers[0].mlp.impl == "dense"
    ids, mask = padded_batch(64, [8, 5], 8, "right", seed=2)
    assert np.abs(jitted_forward(model)(ids, mask) - jitted_forward(dense)(ids, mask)).max() < 1e-5


def test_ragged_and_dense_experts_have_the_same_gradients():
    """Gradients through ragged_dot (its transpose rules) and the sort/unsort gathers."""
    from topd_jax.models.moe import experts_dense, experts_ragged, route

    rng = np.random.default_rng(1)
    n, d, f, e, k = 10, 8, 6, 4, 2
    x, router = rng.standard_normal((n, d), np.float32), rng.standard_normal((e, d), np.float32)
    ws = (rng.standard_normal((e, d, f), np.float32), rng.standard_normal((e, d, f), np.float32),
          rng.standard_normal((e, f, d), np.float32))
    probe = rng.standard_normal((n, d), np.float32)

    def loss(impl, x, router, *ws):
        weights, experts = route(x, router, k, True)
        return jnp.sum(impl(x, weights, experts, *ws) * probe)

    args = (jnp.asarray(x), jnp.asarray(router), *map(jnp.asarray, ws))
    got = jax.grad(lambda *a: loss(experts_ragged, *a), argnums=tuple(range(5)))(*args)
    ref = jax.grad(lambda *a: loss(experts_dense, *a), argnums=tuple(range(5)))(*args)
    for name, a, b in zip(("x", "router", "gate", "up", "down"), got, ref):
        assert np.abs(np.asarray(b)).max() > 0, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=name)


def test_every_token_is_routed_to_its_top_k_experts_without_dropping():
    """Dropless: skewed routing (every token picks expert 3) still gives each token the
    exact mixture of its top-k experts, checked against a per-token NumPy loop."""
    from topd_jax.models.moe import experts_ragged, route

    rng = np.random.default_rng(0)
    n, d, f, e, k = 13, 6, 5, 4, 2
    x = rng.standard_normal((n, d)).astype(np.float32)
    router = rng.standard_normal((e, d)).astype(np.float32)
    x[:, 0], router[3, 0] = 3.0, 10.0  # skew: expert 3 is every token's first choice
    wg, wu = rng.standard_normal((2, e, d, f)).astype(np.float32)
    wd = rng.standard_normal((e, f, d)).astype(np.float32)
    weights, experts = route(jnp.asarray(x), jnp.asarray(router), k, True)
    got = np.asarray(experts_ragged(jnp.asarray(x), weights, experts, wg, wu, wd))
    logits = x @ router.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for i in range(n):
        top = np.argsort(-probs[i])[:k]
        w = probs[i, top] / probs[i, top].sum()
        silu = lambda z: z / (1 + np.exp(-z))
        ref = sum(w[j] * (silu(x[i] @ wg[t]) * (x[i] @ wu[t])) @ wd[t] for j, t in enumerate(top))
        np.testing.assert_allclose(got[i], ref, rtol=1e-4, atol=1e-4)
    assert (np.asarray(experts)[:, 0] == 3).all()  # a capacity-limited MoE would drop tokens here


def test_moe_parameters_have_logical_axes_known_to_the_rules(model):
    from topd_jax.sharding import LOGICAL_AXIS_RULES

    known = {name for name, _ in LOGICAL_AXIS_RULES}
    block = nnx.state(model.layers[0].mlp, nnx.Param)
    for path, var in nnx.to_flat_state(block):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var.get_value().ndim and set(axes) <= known and axes[0] == "expert", path


def test_sharded_forward_and_gradients_split_experts_and_equal_single_device(model):
    """data=2 x fsdp=2 x tensor=2: experts split over "tensor" (expert parallelism in the
    ragged shard_map); logits and parameter gradients equal the single-device ones."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    ids, mask = (jnp.asarray(a) for a in padded_batch(64, [12, 9, 5, 1], 12, "left", seed=7))

    def loss_grads(m, ids, mask):
        graphdef, params = nnx.split(m, nnx.Param)

        def loss(params):
            logits = nnx.merge(graphdef, params)(ids, attention_mask=mask)
            return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)[..., 5]), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, ref), ref_grads = loss_grads(model, ids, mask)
    sharded = random_model(CFG, scale=0.3)  # same values: random_model is deterministic
    shard_model(sharded, mesh)
    gate = sharded.layers[0].mlp.gate_proj[...]
    assert gate.sharding.spec == P("tensor", "fsdp", None)  # 4 of 8 experts per device
    assert gate.addressable_shards[0].data.shape == (4, 16, 24)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    for impl in ("ragged", "dense"):
        m = reconfigure(sharded, moe_impl=impl)  # outside set_mesh: it traces the model abstractly
        with jax.set_mesh(mesh):
            (_, got), grads = loss_grads(m, jax.device_put(ids, batch), jax.device_put(mask, batch))
        assert np.abs(np.asarray(got) - np.asarray(ref)).max() < 1e-5, impl
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{impl} {jax.tree_util.keystr(path)}")


# ---- config: errors, presets -------------------------------------------------------------------

def test_bad_moe_configs_are_refused_naming_the_key():
    hf = dict(TINY_MOE["qwen3moe-norm-dense1"], model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"])
    assert ModelConfig.from_hf_config(hf).moe_layers == (0, 2)
    with pytest.raises(ValueError, match=r"num_experts_per_tok=9 .*num_experts=8"):
        ModelConfig.from_hf_config({**hf, "num_experts_per_tok": 9})
    with pytest.raises(ValueError, match=r"lacks required keys \['moe_intermediate_size'\]"):
        ModelConfig.from_hf_config({k: v for k, v in hf.items() if k != "moe_intermediate_size"})
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1, 3\].*\[3\]"):
        ModelConfig.from_hf_config({**hf, "mlp_only_layers": [3, 1]})
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=512"):
        ModelConfig.from_hf_config({**hf, "shared_expert_intermediate_size": 512})
    with pytest.raises(ValueError, match=r"num_experts.*num_local_experts"):
        ModelConfig.from_hf_config({**hf, "num_local_experts": 4})
    with pytest.raises(ValueError, match="moe_impl='sparse'"):
        CFG.replace(moe_impl="sparse")
    with pytest.raises(ValueError, match="qkv_bias=True"):
        CFG.replace(qkv_bias=True, qk_norm=False)
    with pytest.raises(ValueError, match=r"only \('moe_impl', 'remat', 'attention'"):
        reconfigure(random_model(CFG), num_experts=4)


def test_qwen3_30b_a3b_preset_has_30_5b_params_3_3b_active_by_eval_shape():
    cfg = ModelConfig.preset("qwen3-30b-a3b")
    # By hand: d=2048, 48 layers, 32 q / 4 kv heads of 128, 128 experts of f=768, top-8, V=151936, untied.
    attn = 2048 * 32 * 128 * 2 + 2048 * 4 * 128 * 2 + 2 * 128 + 2 * 2048  # q,o + k,v + q/k norm + 2 RMSNorms
    expert, router = 3 * 2048 * 768, 128 * 2048
    embeddings = 2 * 151936 * 2048 + 2048  # embed + lm_head + final norm
    total = 48 * (attn + 128 * expert + router) + embeddings
    active = 48 * (attn + 8 * expert + router) + embeddings
    assert (total, active) == (30_532_122_624, 3_353_032_704)
    abstract = nnx.eval_shape(lambda: Qwen(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(x.size for x in leaves) == cfg.num_params() == total
    assert cfg.num_active_params() == active
    assert abs(total - 30.5e9) < 0.05e9 and abs(active - 3.3e9) < 0.06e9  # the model card's 30.5B / 3.3B
    assert abstract.layers[47].mlp.gate_proj.get_value().shape == (128, 2048, 768)
    instruct = ModelConfig.preset("qwen3-30b-a3b-instruct-2507")
    assert instruct == cfg.replace(rope_theta=1e7, max_position_embeddings=262144)
    assert ModelConfig.from_hf_config(instruct.to_hf_config()) == instruct


def test_plan_counts_moe_parameter_bytes_per_device():
    from topd_jax.train.plan import abstract_params, param_bytes

    cfg = ModelConfig.preset("qwen3-30b-a3b", dtype="bfloat16", param_dtype="bfloat16")
    params = abstract_params(cfg)
    assert param_bytes(params, {"data": 1, "fsdp": 1, "tensor": 1}) == 2 * cfg.num_params()
    # fsdp=8: every weight except the (replicated) norms splits 8 ways on its embed dim
    per_device = param_bytes(params, {"data": 1, "fsdp": 8, "tensor": 1})
    norms = 2 * (48 * (2 * 2048 + 2 * 128) + 2048)
    assert per_device == (2 * cfg.num_params() - norms) // 8 + norms
    assert param_bytes(params, {"data": 1, "fsdp": 1, "tensor": 8}) < 2 * cfg.num_params() / 7
