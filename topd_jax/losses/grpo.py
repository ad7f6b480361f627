"""GRPO / TAPO pieces (TAPO.md steps 2, 5, 7, 8): advantages, clipped surrogate, KL, OTS.

Arrays in, arrays out, all float32. Token-indexed layout throughout: ``logp[r, t]`` is the
log-probability of token t of row r under the policy being trained, ``old_logp`` under the
policy that sampled it (constants), ``mask[r, t]`` the completion tokens that are trained.
Losses reduce to ``(sum, count)`` pairs (``aggregate``) so micro-batches, devices and hosts
accumulate without bias: the global value is Σ sums / Σ counts.

    A      = group_advantages(rewards [P, G], group_mask)           # [P, G]
    loss_t, clipped = clipped_surrogate(logp, old_logp, A_rows, mask, weights=w)   # [R, L]
    s, n   = aggregate(loss_t, mask, "token_mean")                  # () and ()
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from topd_jax.losses.divergence import safe_log_softmax

ADVANTAGE_SCALES = ("std", "none")
AGGREGATION_MODES = ("token_mean", "sequence_mean")
KL_ESTIMATORS = ("k1", "k2", "k3")

SumCount = tuple[jax.Array, jax.Array]

# exp(±20) ≈ 4.9e8 / 2e-9: far outside any clip range, yet finite in float32, so the
# untaken branch of min(ρA, clip(ρ)A) cannot turn 0·inf into a NaN gradient (verl clamps
# the log-ratio for the same reason).
_MAX_LOG_RATIO = 20.0


def _check_same_shape(**arrays: jax.Array) -> None:
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("shapes differ: " + ", ".join(f"{k} {s}" for k, s in shapes.items()))


def _masked_log_ratio(logp: jax.Array, base_logp: jax.Array, valid: jax.Array) -> jax.Array:
    """logp − base_logp in float32, 0 off ``valid`` and clamped to ±_MAX_LOG_RATIO.

    Double ``where``: padding log-probs may be −inf or garbage; they are replaced *before*
    the subtraction so neither the value nor the gradient sees them.
    """
    a = jnp.where(valid, logp.astype(jnp.float32), 0.0)
    b = jnp.where(valid, base_logp.astype(jnp.float32), 0.0)
    return jnp.clip(a - b, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)


# ---------------------------------------------------------------------------
# Advantages (TAPO step 2; step 5's decoupled G_ref is the same call on its own group)
# ---------------------------------------------------------------------------


def group_advantages(
    rewards: jax.Array,
    group_mask: jax.Array | None = None,
    *,
    eps: float = 1e-6,
    scale: str = "std",
    std_ddof: int = 0,
) -> jax.Array:
    """Group-normalised advantages, one group per row.

    A_i = (r_i − mean_g r) / (std_g r + eps) with ``scale="std"`` (GRPO), or
    A_i = r_i − mean_g r with ``scale="none"`` (Dr. GRPO: no std, no length bias from it).

    Args:
      rewards: ``[P, G]`` P groups (prompts) × G members; any real dtype. Constants: the
        result is under ``stop_gradient``.
      group_mask: ``[P, G]`` bool, True for real members. Padding of variable-size groups
        (e.g. a per-prompt G_ref) is excluded from the mean and std and gets A = 0.
        ``None`` means every member is real.
      eps: added to the std (not the variance), as in GRPO.
      scale: ``"std"`` or ``"none"``.
      std_ddof: 0 (default) the population std over the group; 1 the sample std.
        Why 0: the group is not a sample from which a wider spread is estimated, it *is*
        the set being normalised, so ddof 0 gives the members unit variance exactly and is
        defined for any group size. TRL and verl call ``torch.std`` (ddof 1): pass
        ``std_ddof=1`` to reproduce them (advantages smaller by √((G−1)/G), 0.935 at G = 8).

    Returns:
      ``[P, G]`` float32. Exactly 0 off ``group_mask`` and in every group whose real
      members all have the same reward (zero variance: no learning signal), whatever
      ``eps`` — ``r − mean`` alone would leave float rounding noise there.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale={scale!r} is not one of {ADVANTAGE_SCALES}")
    if std_ddof not in (0, 1):
        raise ValueError(f"std_ddof must be 0 or 1, got {std_ddof!r}")
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [groups, members], got shape {rewards.shape}")
    if group_mask is None:
        valid = jnp.ones(rewards.shape, bool)
    else:
        _check_same_shape(rewards=rewards, group_mask=group_mask)
        valid = group_mask.astype(bool)
    r = jnp.where(valid, lax.stop_gradient(rewards).astype(jnp.float32), 0.0)
    n = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)  # [P, 1]
    mean = jnp.sum(r, axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
    centred = jnp.where(valid, r - mean, 0.0)
    # A group is constant iff max == min over its real members (exact, unlike var == 0).
    hi = jnp.max(jnp.where(valid, r, -jnp.inf), axis=-1, keepdims=True)
    lo = jnp.min(jnp.where(valid, r, jnp.inf), axis=-1, keepdims=True)
    varying = hi > lo  # False for empty and single-member groups too
    if scale == "std":
        var = jnp.sum(centred**2, axis=-1, keepdims=True) / jnp.maximum(n - std_ddof, 1.0)
        # sqrt's gradient is infinite at 0; rewards are constants, but keep it NaN-free.
        std = jnp.sqrt(jnp.where(varying, var, 1.0))
        adv = centred / (std + eps)
    else:
        adv = centred
    return jnp.where(valid & varying, adv, 0.0)


# ---------------------------------------------------------------------------
# PPO-clipped token surrogate (TAPO steps 2 and 8)
# ---------------------------------------------------------------------------


def clipped_surrogate(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-token PPO-clipped policy-gradient loss.

    loss_t = −min(ρ_t A, clip(ρ_t, 1 − clip_low, 1 + clip_high) A) · w_t, with
    ρ_t = exp(logp_t − old_logp_t). At ρ = 1 (first update on fresh rollouts) the gradient
    is −A·w_t·∇logp_t, plain REINFORCE with a group baseline. ``clip_high > clip_low`` is
    DAPO's "clip-higher".

    Args:
      logp: ``[R, L]`` log p_θ of the sampled tokens (differentiated).
      old_logp: ``[R, L]`` log-probs under the sampling policy; constants (stop-gradient).
      advantages: ``[R]`` (one per sequence, broadcast over tokens) or ``[R, L]``;
        constants.
      mask: ``[R, L]`` tokens to train; the loss is exactly 0 elsewhere, and padding
        log-probs (even −inf or NaN) reach neither value nor gradient.
      clip_low, clip_high: ε below and above 1.
      weights: optional ``[R, L]`` per-token w_t (e.g. ``ots_weights``); constants.

    Returns:
      ``(per_token_loss [R, L] float32, clipped [R, L] bool)``; ``clipped`` marks valid
      tokens where the clipped term is strictly smaller, i.e. the token gets no gradient
      (its mean is the usual "clip fraction" metric). Reduce the loss with ``aggregate``.
      The log-ratio is clamped to ±20 so that exp cannot overflow.
    """
    _check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"advantages {advantages.shape} must be [R] {logp.shape[:1]} or [R, L] {logp.shape}"
        )
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    valid = mask.astype(bool)
    adv = lax.stop_gradient(advantages.astype(jnp.float32))
    if adv.ndim == 1:
        adv = adv[:, None]
    adv = jnp.where(valid, adv, 0.0)
    ratio = jnp.exp(_masked_log_ratio(logp, lax.stop_gradient(old_logp), valid))
    unclipped = ratio * adv
    clipped_term = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -jnp.minimum(unclipped, clipped_term)
    if weights is not None:
        _check_same_shape(weights=weights, mask=mask)
        loss = loss * jnp.where(valid, lax.stop_gradient(weights.astype(jnp.float32)), 0.0)
    loss = jnp.where(valid, loss, 0.0)
    return loss, valid & (clipped_term < unclipped)


# The brief's second name for the same function (the lead may import either).
policy_ratio_terms = clipped_surrogate


# ---------------------------------------------------------------------------
# Aggregation to (sum, count)
# ---------------------------------------------------------------------------


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str = "token_mean") -> SumCount:
    """Reduce a per-token quantity to a ``(sum, count)`` pair; the value is sum / count.

    ``"token_mean"`` (DAPO): sum = Σ_{r,t} m·x, count = Σ_{r,t} m. Every token weighs the
      same, so long sequences weigh more; across micro-batches Σ sums / Σ counts is the
      mean over all tokens of the batch.
    ``"sequence_mean"`` (original GRPO): sum = Σ_r (Σ_t m·x / Σ_t m) over non-empty rows,
      count = number of non-empty rows. Every sequence weighs the same; each row's own
      token mean is finished within the call (a row is never split across micro-batches),
      so Σ sums / Σ counts over micro-batches is again the full batch's mean of row means.
      Rows with no valid token add 0 to both.

    Args:
      per_token: ``[..., L]`` (typically ``[R, L]``) float.
      mask: same shape; valid tokens.
      mode: one of ``AGGREGATION_MODES``.

    Returns:
      ``(sum [], count [])`` float32. Differentiable in ``per_token``.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"mode={mode!r} is not one of {AGGREGATION_MODES}")
    _check_same_shape(per_token=per_token, mask=mask)
    valid = mask.astype(bool)
    x = jnp.where(valid, per_token.astype(jnp.float32), 0.0)
    if mode == "token_mean":
        return jnp.sum(x), jnp.sum(valid).astype(jnp.float32)
    n = jnp.sum(valid, axis=-1).astype(jnp.float32)
    row_mean = jnp.sum(x, axis=-1) / jnp.maximum(n, 1.0)
    return jnp.sum(jnp.where(n > 0, row_mean, 0.0)), jnp.sum(n > 0).astype(jnp.float32)


# ---------------------------------------------------------------------------
# KL to a reference policy (optional term)
# ---------------------------------------------------------------------------


def kl_to_reference(
    logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, estimator: str = "k3"
) -> jax.Array:
    """Per-token estimate of KL(π_θ ‖ π_ref) from tokens sampled by π_θ (Schulman, 2020).

    With δ = ref_logp − logp:
      * ``"k1"``: −δ = logp − ref_logp (unbiased, can be negative, high variance);
      * ``"k2"``: δ²/2 (biased, low variance, ≥ 0);
      * ``"k3"``: exp(δ) − δ − 1 (unbiased, ≥ 0, low variance; GRPO's choice).

    Args:
      logp: ``[R, L]`` (differentiated). ref_logp: ``[R, L]`` (constant, stop-gradient).
      mask: ``[R, L]``.

    Returns:
      ``[R, L]`` float32, 0 off ``mask``. δ is clamped to ±20 so exp(δ) stays finite.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not one of {KL_ESTIMATORS}")
    _check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    valid = mask.astype(bool)
    delta = -_masked_log_ratio(logp, lax.stop_gradient(ref_logp), valid)
    if estimator == "k1":
        kl = -delta
    elif estimator == "k2":
        kl = 0.5 * delta**2
    else:
        kl = jnp.exp(delta) - delta - 1.0
    return jnp.where(valid, kl, 0.0)


# ---------------------------------------------------------------------------
# Entropy and OOD token suppression (TAPO step 7)
# ---------------------------------------------------------------------------


def token_entropy(logits: jax.Array, mask: jax.Array, *, temperature: float = 1.0) -> jax.Array:
    """Entropy H_t = −Σ_v p log p of the next-token distribution, per position.

    Args:
      logits: ``[R, L, V]`` (any float dtype), aligned with ``mask`` (the logits that
        predict token t sit at index t, i.e. already shifted by the caller).
      mask: ``[R, L]``; masked rows are never read.
      temperature: logits are divided by it first (use the sampling temperature).

    Returns:
      ``[R, L]`` float32, 0 off ``mask``; 0·log 0 := 0, so −inf logits are fine.
    """
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask {mask.shape} does not match logits {logits.shape}[:-1]")
    valid = mask.astype(bool)
    x = jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0) / temperature
    logp = safe_log_softmax(x)
    p = jnp.exp(logp)
    # Double where: p = 0 entries have logp = −inf; 0·(−inf) would poison value and grad.
    plogp = jnp.where(p > 0, p * jnp.where(p > 0, logp, 0.0), 0.0)
    return jnp.where(valid, -jnp.sum(plogp, axis=-1), 0.0)


def ots_weights(
    logp: jax.Array, entropy: jax.Array, mask: jax.Array, *, lo: float = 0.01, hi: float = 10.0
) -> jax.Array:
    """OOD-token-suppression weights w_t = clip(exp(log p(y_t) + H_t), lo, hi).

    exp(log p + H) = p(y_t) / exp(−H_t): the token's probability relative to the
    distribution's "typical" probability. Tokens the policy finds surprising (mostly the
    inserted correction of a constructed trajectory) get small weights, typical ones ≈ 1.

    Args:
      logp: ``[R, L]`` log-probs of the tokens (from the old-policy pass).
      entropy: ``[R, L]`` H_t at the same positions (e.g. ``token_entropy``).
      mask: ``[R, L]``.
      lo, hi: clip bounds, 0 < lo <= hi.

    Returns:
      ``[R, L]`` float32 under ``stop_gradient``, in [lo, hi] on ``mask`` and 0 off it.
      The clip is applied to the exponent (log lo, log hi) so exp never overflows and
      log p = −inf gives ``lo``.
    """
    if not 0.0 < lo <= hi:
        raise ValueError(f"need 0 < lo <= hi, got lo={lo}, hi={hi}")
    _check_same_shape(logp=logp, entropy=entropy, mask=mask)
    valid = mask.astype(bool)
    z = jnp.where(valid, logp.astype(jnp.float32) + entropy.astype(jnp.float32), 0.0)
    z = jnp.clip(z, jnp.log(jnp.float32(lo)), jnp.log(jnp.float32(hi)))
    # exp(log lo) can round just below lo; the final clip makes the bounds exact.
    w = jnp.clip(jnp.exp(z), lo, hi)
    return lax.stop_gradient(jnp.where(valid, w, 0.0))
