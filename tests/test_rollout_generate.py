"""generate(): greedy parity with transformers, log-probs vs teacher forcing, stops, samples, keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._hf_tiny import build_hf, jitted_forward, padded_batch, torch
from topd_jax.models import load_pretrained
from topd_jax.rollout import generate
from topd_jax.rollout.engine import _generate_jit

VOCAB, LENGTHS, TOTAL, NEW = 96, [9, 5, 1, 7], 9, 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same tiny random Qwen3 in transformers and ours. The LM head is scaled up so the
    greedy choice is never a near-tie (random init gives almost uniform logits)."""
    hf = build_hf("qwen3-untied-hd24", seed=3)
    with torch.no_grad():
        hf.lm_head.weight.mul_(10.0)
    path = tmp_path_factory.mktemp("qwen3")
    hf.save_pretrained(path)
    return hf, load_pretrained(path)


@pytest.fixture(scope="module")
def prompts():
    return padded_batch(VOCAB, LENGTHS, TOTAL, "left", seed=2)


def hf_greedy(hf, ids, mask, eos_ids=None):
    """transformers generate(do_sample=False) with left padding, padded to NEW columns with 0."""
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask.astype(np.int64)), max_new_tokens=NEW,
                          do_sample=False, pad_token_id=0, eos_token_id=eos_ids)
    new = out.numpy()[:, ids.shape[1]:]
    return np.pad(new, ((0, 0), (0, NEW - new.shape[1])))


def test_greedy_equals_transformers_token_for_token(models, prompts):
    hf, ours = models
    ids, mask = prompts
    res = generate(ours, ids, mask, key=jax.random.key(0), max_new_tokens=NEW, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(res.tokens), hf_greedy(hf, ids, mask))
    assert np.asarray(res.mask).all() and (np.asarray(res.lengths) == NEW).all()
    assert not np.asarray(res.finished).any()


def test_greedy_stops_at_eos_like_transformers(models, prompts):
    """eos = every row's greedy token at step 3: rows stop at step <= 3, and so does the loop."""
    hf, ours = models
    ids, mask = prompts
    free = hf_greedy(hf, ids, mask)
    eos = tuple(sorted({int(t) for t in free[:, 3]}))
    ref = hf_greedy(hf, ids, mask, eos_ids=list(eos))
    res = generate(ours, ids, mask, key=jax.random.key(0), max_new_tokens=NEW, temperature=0.0, eos_ids=eos)
    np.testing.assert_array_equal(np.asarray(res.tokens), ref)
    stop = np.array([np.flatnonzero(np.isin(row, eos))[0] for row in free])  # first eos per row
    np.testing.assert_array_equal(res.lengths, stop + 1)
    np.testing.assert_array_equal(res.mask, np.arange(NEW)[None, :] <= stop[:, None])
    assert np.asarray(res.finished).all()
    assert (np.asarray(res.model_logprobs)[~np.asarray(res.mask)] == 0).all()


def test_right_padded_prompts_give_the_same_completions(models, prompts):
    _, ours = models
    ids, mask = prompts
    right_ids, right_mask = padded_batch(VOCAB, LENGTHS, TOTAL, "right", seed=2)
    for b, n in enumerate(LENGTHS):  # same real tokens, other padding side
        right_ids[b, :n] = ids[b, TOTAL - n:]
    left = generate(ours, ids, mask, key=jax.random.key(0), max_new_tokens=NEW, temperature=0.0)
    right = generate(ours, right_ids, right_mask, key=jax.random.key(0), max_new_tokens=NEW, temperature=0.0)
    np.testing.assert_array_equal(left.tokens, right.tokens)
    np.testing.assert_array_equal(left.sequences, right.sequences)  # prompts are left-aligned
    np.testing.assert_array_equal(left.sequence_mask, right.sequence_mask)


# ---- sampling with stops: one compiled configuration shared by the tests below -------------
EOS = (5, 17, 33, 61, 80)
SAMPLING = dict(temperature=0.7, top_k=40, top_p=0.95, eos_ids=EOS)


@pytest.fixture(scope="module")
def sampled(models, prompts):
    _, ours = models
    ids, mask = prompts
    return generate(ours, ids, mask, key=jax.random.key(11), max_new_tokens=NEW, num_samples=3, pad_id=0,
                    **SAMPLING)


def test_stops_at_eos_and_masks_everything_after(sampled):
    tokens, mask = np.asarray(sampled.tokens), np.asarray(sampled.mask)
    lengths, finished = np.asarray(sampled.lengths), np.asarray(sampled.finished)
    assert tokens.shape == mask.shape == (len(LENGTHS) * 3, NEW)
    assert finished.any() and not finished.all(), "fixture should have rows of both kinds"
    np.testing.assert_array_equal(mask, np.arange(NEW)[None, :] < lengths[:, None])
    assert (tokens[~mask] == 0).all()
    for row, n, done in zip(tokens, lengths, finished):
        assert not np.isin(row[:n - 1], EOS).any()  # nothing before the stop is an eos
        assert np.isin(row[n - 1], EOS) == done
        assert done or n == NEW  # unfinished rows used exactly max_new_tokens


def test_log_probs_equal_teacher_forced_log_probs(models, sampled):
    """model_logprobs = log softmax(logits) and logprobs = log softmax(warped logits) of the
    same sequences run through the model in one teacher-forced forward pass."""
    _, ours = models
    seq, seq_mask = np.asarray(sampled.sequences), np.asarray(sampled.sequence_mask)
    logits = jitted_forward(ours)(seq, seq_mask)[:, TOTAL - 1:-1]  # column j predicts column j + 1
    tokens, mask = np.asarray(sampled.tokens), np.asarray(sampled.mask)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ref = np.take_along_axis(np.asarray(logp), tokens[..., None], axis=-1)[..., 0]
    assert np.abs(np.asarray(sampled.model_logprobs) - ref)[mask].max() < 1e-4
    from topd_jax.rollout import SamplingConfig, sampling_logits

    config = SamplingConfig(SAMPLING["temperature"], SAMPLING["top_p"], SAMPLING["top_k"])
    warped = sampling_logits(jnp.asarray(logits.reshape(-1, VOCAB)), config).reshape(logits.shape)
    ref_warped = np.take_along_axis(np.asarray(jax.nn.log_softmax(warped, axis=-1)), tokens[..., None], -1)[..., 0]
    assert np.abs(np.asarray(sampled.logprobs) - ref_warped)[mask].max() < 1e-4
    assert (np.asarray(sampled.logprobs)[mask] > np.asarray(sampled.model_logprobs)[mask]).mean() > 0.5  # T < 1


def test_samples_of_one_prompt_are_consecutive_rows(sampled, prompts):
    ids, mask = prompts
    prompt_part = np.asarray(sampled.sequences)[:, :TOTAL]
    np.testing.assert_array_equal(prompt_part, np.repeat(np.where(mask, ids, 0), 3, axis=0))  # pads -> pad_id
    np.testing.assert_array_equal(np.asarray(sampled.prompt_mask)[:, :TOTAL], np.repeat(mask, 3, axis=0))
    assert not np.asarray(sampled.prompt_mask)[:, TOTAL:].any()
    np.testing.assert_array_equal(np.asarray(sampled.completion_mask)[:, TOTAL:], sampled.mask)
    toks = np.asarray(sampled.tokens)
    assert not (toks[0::3] == toks[1::3]).all()  # different keys per sample


def test_same_key_same_tokens_other_key_other_tokens(models, prompts, sampled):
    _, ours = models
    ids, mask = prompts
    size = _generate_jit._cache_size()
    again = generate(ours, ids, mask, key=jax.random.key(11), max_new_tokens=NEW, num_samples=3, **SAMPLING)
    other = generate(ours, ids, mask, key=jax.random.key(12), max_new_tokens=NEW, num_samples=3, **SAMPLING)
    assert _generate_jit._cache_size() == size  # same shapes and settings: no recompilation
    np.testing.assert_array_equal(again.tokens, sampled.tokens)
    np.testing.assert_array_equal(again.logprobs, sampled.logprobs)
    assert not np.array_equal(other.tokens, sampled.tokens)


def test_per_row_keys_are_used_as_given(models, prompts, sampled):
    _, ours = models
    ids, mask = prompts
    keys = jax.random.split(jax.random.key(11), len(LENGTHS) * 3)  # what one key is split into
    res = generate(ours, ids, mask, key=keys, max_new_tokens=NEW, num_samples=3, **SAMPLING)
    np.testing.assert_array_equal(res.tokens, sampled.tokens)
    raw = generate(ours, ids, mask, key=jax.random.PRNGKey(11), max_new_tokens=NEW, num_samples=3, **SAMPLING)
    np.testing.assert_array_equal(raw.tokens, sampled.tokens)  # old-style uint32 keys work too


def test_bad_inputs_are_refused_by_name(models, prompts):
    _, ours = models
    ids, mask = prompts
    with pytest.raises(ValueError, match=r"prompt_ids \(4, 9\) and prompt_mask \(4, 8\)"):
        generate(ours, ids, mask[:, 1:], key=jax.random.key(0), max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate(ours, ids, mask, key=jax.random.key(0), max_new_tokens=0)
    with pytest.raises(ValueError, match=r"key has shape \(3,\)"):
        generate(ours, ids, mask, key=jax.random.split(jax.random.key(0), 3), max_new_tokens=3)
    with pytest.raises(ValueError, match="eos_ids"):
        generate(ours, ids, mask, key=jax.random.key(0), max_new_tokens=3, eos_ids=(-1,))
    with pytest.raises(ValueError, match="top_p=2.0"):
        generate(ours, ids, mask, key=jax.random.key(0), max_new_tokens=3, top_p=2.0)
