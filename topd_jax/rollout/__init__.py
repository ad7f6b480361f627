"""Native JAX sampler: jitted prefill + KV-cache decode loop, and TOPD branching.

    from topd_jax.rollout import generate, continue_from
    res = generate(model, prompt_ids, prompt_mask, key=key, max_new_tokens=256, num_samples=4)
    fut = continue_from(teacher, res.sequences, res.sequence_mask, branch_at, key=key2, num_tokens=50)
"""

# ---- generation ---------------------------------------------------------------------------
from topd_jax.rollout.engine import GenerationResult, generate, generate_impl

# ---- branching (TOPD continuations) -------------------------------------------------------
from topd_jax.rollout.branch import branch_points, continue_from, continue_impl

# ---- sampling -----------------------------------------------------------------------------
from topd_jax.rollout.sampling import SamplingConfig, sample, sampling_logits, top_k_mask, top_p_mask

__all__ = [
    "GenerationResult",
    "SamplingConfig",
    "branch_points",
    "continue_from",
    "continue_impl",
    "generate",
    "generate_impl",
    "sample",
    "sampling_logits",
    "top_k_mask",
    "top_p_mask",
]
