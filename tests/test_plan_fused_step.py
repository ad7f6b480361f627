"""``--plan`` measures the update that really runs: with ``topd.fused_main_pass`` that is the
step fed a ``PreparedBatch`` with ℓ_t and a ``PrecomputedGrad`` (plus a row for the fused ℓ_t
pass in ``prepare``), not the separate-pass step the plan used to compile instead."""

import jax

from tests._train_tiny import tiny_config
from topd_jax.algorithms import Frozen, build_objective, prepare_batch
from topd_jax.train.loop import _loader, rollout_len
from topd_jax.train.optim import lr_schedule, make_optimizer
from topd_jax.train.plan import memory_plan
from topd_jax.train.setup import load_model, plan_run
from topd_jax.train.state import create_train_state
from topd_jax.train.step import TrainStep

FUSED_ROW = "compiled fused ℓ_t pass temporaries (forward + backward)"


def test_plan_compiles_the_fused_step_that_prepare_batch_feeds(tmp_path):
    from flax import nnx
    cfg = tiny_config(tmp_path, "algorithm=topd", "topd.detector=kl_window",
                      "topd.guidance_target=student_positions", steps=1)
    assert cfg.fuses_main_pass
    plan = plan_run(cfg)
    n = jax.device_count()
    planned = memory_plan(cfg, plan.student.config, plan.teacher.config, n, backend="cpu", compile_step=True).rows
    assert planned[FUSED_ROW] > 0 and planned["fused ℓ_t pass gradient (step input)"] > 0
    mesh = plan.mesh
    student, teacher = load_model(plan.student, mesh), load_model(plan.teacher, mesh)
    with jax.set_mesh(mesh):
        tx = make_optimizer(cfg.optim, cfg.steps)
        graphdef, state, shardings = create_train_state(student, tx, mesh, seed=0)
        frozen = Frozen(teacher, teacher.lm_head_weight(), plan.text.eos_ids, plan.text.pad_id)
        batch, _, _ = prepare_batch(cfg, nnx.merge(graphdef, state.params), next(_loader(cfg, plan)),
                                    jax.random.key(2), frozen, {})
        assert batch.precomputed is not None
        loss_fn, normalize = build_objective(cfg, graphdef, rollout_len(cfg))
        step = TrainStep(loss_fn, tx, lr_schedule(cfg.optim, cfg.steps), shardings, mesh,
                         micro_batches=cfg.optim.micro_batches, normalize=normalize)
        fn, b_sh, head_sh = step.compiled(batch, frozen.teacher_head)
        arrays = {k: jax.device_put(v, b_sh[k]) for k, v in batch.arrays.items()}  # as TrainStep places them
        measured = fn.lower(state, arrays, jax.device_put(frozen.teacher_head, head_sh),
                            batch.precomputed).compile().memory_analysis()
    assert planned["compiled step temporaries"] == measured.temp_size_in_bytes
