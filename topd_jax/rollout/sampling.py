"""Turning next-token logits into a token: temperature, top-k, top-p (nucleus), greedy.

Order of the warpers as in transformers and vLLM: divide by the temperature, keep the top-k
logits, then keep the smallest set of the remaining tokens whose probability reaches top_p.
The sampling distribution is the softmax of what is left; `sample` draws from it with one
PRNG key per row and also returns the log-prob of the drawn token under that distribution.

Two CPU-motivated choices (measured on CPU-2, [16, 151936] float32 logits):
- `argmax_first` = max, then the smallest index holding it: 2 ms instead of 19 ms for
  `jnp.argmax` (XLA's CPU argmax is a two-operand reduce that does not vectorise).
- `categorical` draws in two levels, a block of `BLOCK` tokens by its total probability, then
  a token inside the block (Gumbel-max at both levels). P(block) P(token | block) = P(token),
  so it is exact, and it needs V/BLOCK + BLOCK random numbers per row instead of V:
  generating 16 x 151936 Gumbel variates alone costs 40 ms, more than the LM head.

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


def _ordered_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (sign bit flipped for positives, all bits for
    negatives), so thresholds can be searched exactly by bisection over integers."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _bisect(lo: jax.Array, hi: jax.Array, ok, largest: bool) -> jax.Array:
    """The largest (or smallest) uint32 t in [lo, hi] with ok(t), per row; ok is monotone and
    holds at lo (largest) / hi (smallest). 32 halvings cover the whole uint32 range."""
    def step(_, bounds):
        lo, hi = bounds
        half = (hi - lo) // 2
        if largest:
            mid = lo + half + (hi - lo) % 2  # upper middle: lo always moves
            good = ok(mid)
            return jnp.where(good, mid, lo), jnp.where(good, hi, mid - 1)
        mid = lo + half
        good = ok(mid)
        return jnp.where(good, lo, mid + 1), jnp.where(good, mid, hi)

    return jax.lax.fori_loop(0, 32, step, (lo, hi))[0]


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """[r, v] bool: the k largest logits of each row (ties with the k-th all kept).

    The k-th largest value is found by bisection on its bits: 32 vectorised counting passes.
    (`lax.top_k` and `jnp.sort` over 151936 logits are 15x slower on CPU.)
    """
    if k == 0 or k >= logits.shape[-1]:
        return jnp.ones(logits.shape, bool)
    bits = _ordered_bits(logits)  # [r, v]
    kth = _bisect(bits.min(axis=-1), bits.max(axis=-1),
                  lambda t: jnp.sum(bits >= t[:, None], axis=-1) >= k, largest=True)  # [r]
    return bits >= kth[:, None]


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """[r, v] bool: the smallest set of most likely tokens whose probability is >= p.

    A token is kept when the mass of the tokens strictly more likely than it is < p (the
    most likely token is always kept; ties are kept together). The smallest logit with that
    property is found by bisection on its bits (masked sums in float32; no sort).
    """
    if p >= 1.0:
        return jnp.ones(logits.shape, bool)
    bits = _ordered_bits(logits)  # [r, v]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    def mass_above_below_p(t):
        return jnp.sum(jnp.where(bits > t[:, None], probs, 0.0), axis=-1) < p

    lowest_kept = _bisect(bits.min(axis=-1), bits.max(axis=-1), mass_above_below_p, largest=False)  # [r]
    return bits >= lowest_kept[:, None]


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


BLOCK = 512  # tokens per block in `categorical` (about sqrt(V) for the Qwen vocabulary)


def argmax_first(x: jax.Array) -> jax.Array:
    """[r, v] -> [r] int32 index of the first maximum (as jnp.argmax, but vectorised on CPU)."""
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """Exact draws from softmax(logits): keys [r], logits [r, v] float32 (-inf allowed) -> [r] int32."""
    rows, vocab = logits.shape
    if vocab <= 2 * BLOCK:  # one level is cheap enough
        noise = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,)))(keys)
        return argmax_first(logits + noise)
    num_blocks = -(-vocab // BLOCK)
    blocks = jnp.pad(logits, ((0, 0), (0, num_blocks * BLOCK - vocab)), constant_values=-jnp.inf)
    blocks = blocks.reshape(rows, num_blocks, BLOCK)
    pick_block, pick_token = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)  # [r] each
    block_logits = jax.nn.logsumexp(blocks, axis=-1)  # [r, blocks]: log of each block's mass
    block = argmax_first(block_logits + jax.vmap(lambda k: jax.random.gumbel(k, (num_blocks,)))(pick_block))
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # [r, BLOCK]
    token = argmax_first(inside + jax.vmap(lambda k: jax.random.gumbel(k, (BLOCK,)))(pick_token))
    return block * BLOCK + token


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
        tokens = argmax_first(logits)
        return tokens, jnp.zeros(tokens.shape, jnp.float32)
    warped = sampling_logits(logits, config)
    tokens = categorical(keys, warped)
    return tokens, token_log_prob(warped, tokens)
