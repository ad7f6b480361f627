"""What the no-gradient stage hands the update: rows, and (TOPD's fused main pass) a gradient.

    batch = PreparedBatch(arrays={"ids": ..., "loss_mask": ..., ...})                    # rows only
    batch = PreparedBatch(arrays, PrecomputedGrad(grads, through=("token_loss",)))     # fused pass

``arrays`` are rows (axis 0 splits into micro-batches; keys in ``algorithms.objective``).
``precomputed`` is the part of the loss's gradient that flows through arrays the step's loss
reads as constants: TOPD computes ℓ_t for its detector from the OPD term's own forward pass
(``topd.fused_main_pass``), keeps the residuals, and pulls ``∂L/∂ℓ`` back through them in
``prepare``; the step's loss then reads ``arrays["token_loss"]`` under ``stop_gradient`` (its
value is exact) and ``train.step`` adds ``grads`` to the gradient it differentiates itself.
``diagnostics`` are token-indexed arrays for the trainer's logging only (never passed to the
step): with a detector, ``token_loss`` ℓ_t ``[R, L]`` and ``guided`` ``[R, L]`` bool (the guided
candidate positions; TOPD with guidance).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class PrecomputedGrad:
    """``grads`` (a pytree like the params): ∂L/∂θ through ``through``, the names of the
    batch arrays that the loss reads as constants (``stop_gradient``). Valid for the params it
    was computed with and for one update on the whole batch (no micro- or mini-batches)."""
    grads: Any
    through: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())


@flax.struct.dataclass
class PreparedBatch:
    """The update's input: ``arrays`` ``{name: [rows, ...]}`` and an optional ``precomputed``;
    ``diagnostics`` ``{name: [rows, ...]}`` for logging only (the module doc)."""
    arrays: dict[str, jax.Array]
    precomputed: PrecomputedGrad | None = None
    diagnostics: dict[str, jax.Array] | None = None

    def __post_init__(self):
        if self.precomputed is not None:
            missing = sorted(set(self.precomputed.through) - set(self.arrays))
            if missing:
                raise ValueError(f"PrecomputedGrad is through {missing}, which the batch arrays "
                                 f"{sorted(self.arrays)} lack")
