"""Logits parity with transformers' PyTorch Qwen2ForCausalLM / Qwen3ForCausalLM (float32)."""

import numpy as np
import pytest

from tests._hf_tiny import TINY, build_hf, hf_logits, jitted_forward, padded_batch
from topd_jax.models import load_pretrained

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request, tmp_path_factory):
    hf = build_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, jitted_forward(load_pretrained(path))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("lengths,total", [([1, 1, 1, 1], 1), ([16, 9, 5, 1], 16)])
def test_logits_match_transformers_on_padded_batches(pair, side, lengths, total):
    name, hf, ours = pair
    ids, mask = padded_batch(TINY[name][1]["vocab_size"], lengths, total, side)
    got = ours(ids, mask)
    ref = hf_logits(hf, ids, mask)
    assert got.dtype == np.float32 and got.shape == ref.shape
    # padding positions are garbage on both sides; compare the real tokens only
    assert np.abs(got - ref)[mask].max() <= TOL


def test_default_call_matches_transformers_without_mask(pair):
    name, hf, ours = pair
    import torch

    ids = np.random.default_rng(1).integers(0, TINY[name][1]["vocab_size"], (4, 16))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    got = ours(ids.astype(np.int32), np.ones(ids.shape, bool))
    assert np.abs(got - ref).max() <= TOL


def test_padding_tokens_do_not_change_real_logits(pair):
    name, _, ours = pair
    ids, mask = padded_batch(TINY[name][1]["vocab_size"], [16, 9, 5, 1], 16, "left")
    scrambled = np.where(mask, ids, (ids + 7) % TINY[name][1]["vocab_size"])
    a, b = ours(ids, mask), ours(scrambled, mask)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a[mask], b[mask], atol=1e-6)
