"""Turning next-token logits into a token: temperature, top-k, top-p (nucleus), greedy.

Order of the warpers as in transformers and vLLM: divide by the temperature, keep the top-k
logits, then keep the smallest set of the remaining tokens whose probability reaches top_p.
The sampling distribution is the softmax of what is left; `sample` draws from it with one
PRNG key per row (Gumbel-max via `jax.random.categorical`) and also returns the log-prob of
the drawn token under that distribution.

Letters: r rows (batch), v vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each token (static: part of the jit cache key).

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_p:       nucleus mass in (0, 1]; 1 keeps every token.
    top_k:       keep the k most likely tokens; 0 keeps every token.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature={self.temperature!r}; expected >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r}; expected 0 < top_p <= 1")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k!r}; expected an int >= 0 (0 = no top-k)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def is_model_distribution(self) -> bool:
        """Sampling from the unmodified model (T = 1, no truncation)."""
        return self.temperature == 1.0 and self.top_p == 1.0 and self.top_k == 0


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """[r, v] bool: the k largest logits of each row (ties with the k-th all kept)."""
    if k == 0 or k >= logits.shape[-1]:
        return jnp.ones(logits.shape, bool)
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [r, 1]
    return logits >= kth


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """[r, v] bool: the smallest set of most likely tokens whose probability is >= p.

    A token is kept when the mass of the tokens strictly more likely than it is < p (the
    most likely token is always kept); ties with the last kept logit are kept too.
    """
    if p >= 1.0:
        return jnp.ones(logits.shape, bool)
    ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # [r, v] descending
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative mass
    num_kept = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # [r, 1], >= 1
    threshold = jnp.take_along_axis(ordered, num_kept - 1, axis=-1)  # smallest kept logit
    return logits >= threshold


def sampling_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """[r, v] float32 logits of the sampling distribution: scaled by 1/T, -inf outside the
    top-k / top-p support. Not for greedy (T = 0)."""
    if config.greedy:
        raise ValueError("sampling_logits: temperature=0 (greedy) has no sampling logits")
    scaled = logits.astype(jnp.float32) / config.temperature
    keep = top_k_mask(scaled, config.top_k)
    if config.top_p < 1.0:
        # top-p acts on the distribution left after top-k (renormalised), as transformers does
        keep = keep & top_p_mask(jnp.where(keep, scaled, -jnp.inf), config.top_p)
    return jnp.where(keep, scaled, -jnp.inf)


def token_log_prob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[tokens]: [r, v], [r] -> [r] float32 (no [r, v] log-softmax kept)."""
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sample(keys: jax.Array, logits: jax.Array, config: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """One token per row.

    keys [r] (typed PRNG keys, one per row); logits [r, v] float32 ->
    (tokens [r] int32, log-probs [r] float32 of the tokens under the sampling distribution).
    Greedy (T = 0) returns the argmax and log-prob 0 (it is a point mass).
    """
    if config.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, jnp.zeros(tokens.shape, jnp.float32)
    warped = sampling_logits(logits, config)
    tokens = jax.vmap(jax.random.categorical)(keys, warped).astype(jnp.int32)  # one key per row
    return tokens, token_log_prob(warped, tokens)
