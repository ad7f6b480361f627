"""--plan: per-device bytes from eval_shape + the rules table, checked against placed arrays."""

import jax
import pytest

from topd_jax.models import ModelConfig, init_model
from topd_jax.sharding import MeshConfig, make_mesh
from topd_jax.train.__main__ import main
from topd_jax.config.schema import OptimConfig
from topd_jax.train.optim import make_optimizer
from topd_jax.train.plan import (AttentionPlan, PlanArgs, PlanArgsError, abstract_params, attention_bytes,
                                 kv_cache_bytes, opt_state_bytes, param_bytes, split_plan_args)
from topd_jax.train.state import create_train_state

TINY = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   intermediate_size=48, rope_theta=1e4)
REAL_YAML = """\
algorithm: topd
student: {preset: qwen3-4b, dtype: bfloat16, param_dtype: bfloat16, remat: full}
teacher: {preset: qwen3-8b, dtype: bfloat16, param_dtype: bfloat16}
mesh: {data: 1, fsdp: -1, tensor: 1}
data: {source: files, train_files: [/nonexistent/train.jsonl], prompts_per_step: 16}
"""


def _on_device0(tree) -> int:
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


def test_planned_param_and_optimizer_bytes_equal_the_placed_arrays():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # fsdp and tensor both split weights
    tx = make_optimizer(OptimConfig(), 10)
    _, state, _ = create_train_state(init_model(TINY, seed=0, mesh=mesh), tx, mesh, seed=0)
    params = abstract_params(TINY)
    assert param_bytes(params, dict(mesh.shape)) == _on_device0(state.params)
    assert opt_state_bytes(tx, params, dict(mesh.shape)) == _on_device0(state.opt_state)


def test_kv_cache_bytes_shard_rows_over_data_and_fsdp():
    cfg = ModelConfig.preset("qwen3-4b", dtype="bfloat16")  # 36 layers, 8 kv heads x 128
    full = 2 * 36 * 256 * 8800 * 8 * 128 * 2                 # k and v, bf16
    assert kv_cache_bytes(cfg, 256, 8800, {"data": 2, "fsdp": 4, "tensor": 1}) == full // 8
    assert kv_cache_bytes(cfg, 256, 8800, {"data": 1, "fsdp": 1, "tensor": 8}) == full // 8  # kv heads
    assert kv_cache_bytes(cfg, 3, 10, {"data": 2, "fsdp": 1, "tensor": 1}) == 2 * 36 * 3 * 10 * 8 * 128 * 2


def test_plan_flags_are_split_from_the_config_arguments():
    assert split_plan_args(["--config", "x.yaml", "steps=2"]) == (None, ["--config", "x.yaml", "steps=2"])
    args, rest = split_plan_args(["--plan", "--device-memory-gib", "80", "--plan-devices=64", "--no-compile",
                                  "--plan-backend", "tpu", "steps=2"])
    assert args == PlanArgs(device_memory_gib=80.0, devices=64, compile=False, backend="tpu")
    assert rest == ["steps=2"]
    with pytest.raises(PlanArgsError, match="--plan-backend must be one of cpu, gpu, tpu, got 'cuda'"):
        split_plan_args(["--plan", "--plan-backend=cuda"])
    with pytest.raises(PlanArgsError, match="--device-memory-gib needs a number, got 'lots'"):
        split_plan_args(["--plan", "--device-memory-gib", "lots"])
    with pytest.raises(PlanArgsError, match="only valid with --plan"):
        split_plan_args(["--plan-devices", "8"])


def test_demo_plan_compiles_the_step_and_reports_the_fit(capsys):
    assert main(["--plan", "--device-memory-gib", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("student params", "optimizer state", "teacher params", "student KV cache",
                "compiled step temporaries", "fits in 1 GiB"):
        assert row in out, out
    temp = int(out.split("compiled step temporaries")[1].split("(")[1].split(" B)")[0].replace(",", ""))
    assert temp > 0
    assert main(["--plan", "--no-compile", "--device-memory-gib", "0.0001"]) == 3
    assert "does NOT fit" in capsys.readouterr().out


def test_real_size_plan_uses_eval_shape_only(tmp_path, capsys):
    path = tmp_path / "real.yaml"
    path.write_text(REAL_YAML)
    assert main(["--config", str(path), "--plan", "--plan-devices", "64", "--device-memory-gib", "95"]) == 0
    out = capsys.readouterr().out
    assert "'fsdp': 64" in out and "not measured" in out and "fits in 95 GiB" in out
    student = int(out.split("student params")[1].split("(")[1].split(" B)")[0].replace(",", ""))
    # qwen3-4b in bf16 split 64 ways (norm scales are replicated: a few KB more)
    n = ModelConfig.preset("qwen3-4b").num_params()
    assert 2 * n / 64 <= student < 2 * n / 64 + 2_000_000
    assert main(["--config", str(path), "--plan", "--device-memory-gib", "16"]) == 3  # 8 local devices
    assert "does NOT fit in 16 GiB" in capsys.readouterr().out


def test_xla_attention_row_is_one_layer_of_float32_scores_and_probabilities():
    cfg = ModelConfig.preset("qwen3-8b", dtype="bfloat16")  # 32 heads in 8 kv groups
    per_row = 32 * 8800 * 8800 * (4 + 2)
    xla = AttentionPlan("xla")
    assert attention_bytes(cfg, 4, 8800, 8800, {"data": 1, "fsdp": 4, "tensor": 2}, attn=xla) == per_row // 2
    assert attention_bytes(cfg, 3, 8800, 8800, {"data": 1, "fsdp": 4, "tensor": 1}, attn=xla) == 3 * per_row  # 3 % 4
    assert attention_bytes(cfg, 3, 8800, 8800, {"data": 1, "fsdp": 4, "tensor": 1}, attn=xla, backward=True) == \
        2 * 3 * per_row


@pytest.mark.parametrize("impl", ["xla", "chunked", "cudnn", "splash"])
@pytest.mark.parametrize("backward", [False, True])
def test_attention_row_is_quadratic_in_length_for_xla_and_linear_for_the_blocked_kernels(impl, backward):
    cfg = ModelConfig.preset("qwen3-4b", dtype="bfloat16")
    mesh = {"data": 1, "fsdp": 4, "tensor": 2}
    attn = AttentionPlan(impl, 512, 512)
    b = {t: attention_bytes(cfg, 16, t, t, mesh, attn=attn, backward=backward) for t in (4096, 8192, 16384)}
    if impl == "xla":
        assert b[8192] == 4 * b[4096] and b[16384] == 4 * b[8192]
    else:  # affine in T (a per-query part + a constant block): equal steps, and at most 2x per doubling
        assert b[16384] - b[8192] == 2 * (b[8192] - b[4096]) > 0
        assert b[8192] <= 2 * b[4096]
        assert b[8192] < b[4096] * 2.01
    assert b[16384] < 2 ** 30 * (400 if impl == "xla" else 8)


def test_chunked_attention_row_counts_its_blocks_and_per_query_arrays():
    """One layer, 1 row, 1 kv head of 2 query heads, T = S = 1024, blocks 256 x 128, h = 8."""
    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                      intermediate_size=32)
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    block, per_q, per_q_h, dkv = 2 * 256 * 128 * 4, 2 * 1024 * 4, 2 * 1024 * 8 * 4, 1024 * 8 * 4
    fwd = 3 * block + 2 * 2 * 256 * 4 + 2 * 256 * 8 * 4 + per_q_h + 2 * per_q
    attn = AttentionPlan("chunked", 256, 128)
    assert attention_bytes(cfg, 1, 1024, 1024, one, attn=attn) == fwd
    assert attention_bytes(cfg, 1, 1024, 1024, one, attn=attn, backward=True) == \
        fwd + 2 * per_q + 2 * per_q_h + 2 * dkv + 3 * block
    # flash: the LSE and one block (no mask temporaries); cudnn adds its compacted q, k, v, out (float32 here)
    assert attention_bytes(cfg, 1, 1024, 1024, one, attn=AttentionPlan("splash", 256, 128)) == block + per_q
    assert attention_bytes(cfg, 1, 1024, 1024, one, attn=AttentionPlan("cudnn", 256, 128)) == \
        block + per_q + 2 * per_q_h + 2 * dkv


def test_plan_rows_name_the_attention_implementation(tmp_path):
    from tests._train_tiny import tiny_config
    from topd_jax.train.plan import memory_plan, plan_models
    cfg = tiny_config(tmp_path, "algorithm=warmup", "warmup.max_new_tokens=8", "student.remat=full", steps=1)
    student, teacher = plan_models(cfg)

    def attention_rows(impl, backend="cpu"):
        plan = memory_plan(cfg, student.replace(attention=impl), teacher.replace(attention=impl), 8,
                           backend=backend)
        return [name for name in plan.rows if name.startswith("attention")]

    assert attention_rows("xla") == ["attention, one layer + backward (student update; xla, materialised)"]
    assert attention_rows("chunked") == ["attention, one layer + backward (student update; chunked, block 512x512)"]
    assert attention_rows("auto") == attention_rows("chunked")  # auto on CPU: chunked


def test_warmup_scoring_in_row_groups_equals_one_forward():
    """The row groups the plan counts for the warm-up's teacher forward do not change its output."""
    import jax.numpy as jnp
    import numpy as np

    from topd_jax.algorithms.scoring import forward_hidden
    model = init_model(TINY, seed=0)
    ids = jax.random.randint(jax.random.key(0), (8, 12), 0, TINY.vocab_size)
    mask = jnp.ones((8, 12), bool).at[:, :3].set(jnp.arange(8)[:, None] % 3 == 0)  # some left padding
    whole = forward_hidden(model, ids, mask)
    np.testing.assert_allclose(forward_hidden(model, ids, mask, row_groups=4), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="row_groups=3 must be >= 1 and divide the 8 rows"):
        forward_hidden(model, ids, mask, row_groups=3)


def test_plan_rows_equal_a_measured_tiny_topd_step(tmp_path):
    """KV caches, the update batch and the compiled step's temporaries, as placed or compiled
    by the trainer's own functions on a data=2/fsdp=2/tensor=2 mesh, equal the plan's rows; the
    estimated update rows (no compile) are at least the compiled temporaries."""
    import numpy as np
    from flax import nnx

    from tests._train_tiny import tiny_config
    from topd_jax.algorithms import Frozen, PreparedBatch, build_objective, prepare_batch
    from topd_jax.models.cache import slots_for
    from topd_jax.rollout import continue_from, generate
    from topd_jax.train.loop import _loader, rollout_len
    from topd_jax.train.optim import lr_schedule
    from topd_jax.train.plan import memory_plan
    from topd_jax.train.setup import load_model, plan_run
    from topd_jax.train.step import TrainStep, batch_shardings

    # kl_window: the guidance's own teacher continuations (m = 1 per rollout), fewer compiles
    # topd.fused_main_pass=false: the plan compiles the OPD term into the step (see plan.py), as
    # this step then does; the fused step does the same work split between prepare and step.
    cfg = tiny_config(tmp_path, "algorithm=topd", "topd.detector=kl_window", "mesh.data=2", "mesh.fsdp=2",
                      "mesh.tensor=2", "data.prompts_per_step=4", "topd.fused_main_pass=false", steps=1)
    plan = plan_run(cfg)
    planned = memory_plan(cfg, plan.student.config, plan.teacher.config, 8, backend="cpu", compile_step=True).rows
    r, length, k = 8, rollout_len(cfg), cfg.topd.window
    mesh = plan.mesh
    student, teacher = load_model(plan.student, mesh), load_model(plan.teacher, mesh)
    with jax.set_mesh(mesh):
        tx = make_optimizer(cfg.optim, cfg.steps)
        graphdef, state, shardings = create_train_state(student, tx, mesh, seed=0)
        model = nnx.merge(graphdef, state.params)
        prompts = next(_loader(cfg, plan))
        gen = generate(model, prompts["prompt_ids"], prompts["prompt_mask"], key=jax.random.key(0),
                       max_new_tokens=cfg.rollout.max_new_tokens, num_samples=cfg.rollout.n, return_cache=True)
        assert planned[f"student KV cache, rollouts [{r}x{length - 1}]"] == _on_device0((gen.cache.k, gen.cache.v))
        branch_at = np.full((r, 1), length - 1)  # one guided point per rollout row
        cont = continue_from(teacher, gen.sequences, gen.sequence_mask, branch_at, key=jax.random.key(1),
                             num_tokens=k, return_cache=True)
        shared, own = slots_for(length), slots_for(k)  # the rollouts' cache once, K slots per continuation
        assert planned[f"teacher KV cache, continuations [{r}x{shared} shared + {r}x{own}]"] == \
            _on_device0((cont.cache.prefix.k, cont.cache.prefix.v, cont.cache.suffix.k, cont.cache.suffix.v))
        frozen = Frozen(teacher, teacher.lm_head_weight(), plan.text.eos_ids, plan.text.pad_id)
        batch = prepare_batch(cfg, model, prompts, jax.random.key(2), frozen, {})[0].arrays
        sh = batch_shardings(batch, mesh)
        batch = {name: jax.device_put(x, sh[name]) for name, x in batch.items()}  # as TrainStep places it
        assert planned["update batch arrays"] == _on_device0(batch)
        loss_fn, normalize = build_objective(cfg, graphdef, length)
        step = TrainStep(loss_fn, tx, lr_schedule(cfg.optim, cfg.steps), shardings, mesh,
                         micro_batches=cfg.optim.micro_batches, normalize=normalize)
        fn, _, _ = step.compiled(PreparedBatch(batch), frozen.teacher_head)
        measured = fn.lower(state, batch, frozen.teacher_head, None).compile().memory_analysis()
    assert planned["compiled step temporaries"] == measured.temp_size_in_bytes
    # Without the compile (large models) the update's activation rows stand in: an upper bound.
    estimated = memory_plan(cfg, plan.student.config, plan.teacher.config, 8, backend="cpu").rows
    update = [b for name, b in estimated.items() if "(student update" in name]
    assert len(update) == 3 and sum(update) >= measured.temp_size_in_bytes
