"""Chunked causal attention (queries in blocks that skip unreachable keys) equals the one-chunk path."""

import jax
import numpy as np
import pytest

from prunesae_jax.models import decoder as dec
from prunesae_jax.models import init_params, resid_post
from prunesae_jax.testing import tiny_config


@pytest.mark.parametrize('family', ['llama', 'gemma3_text'])
def test_chunked_attention_matches_single_chunk(family, monkeypatch):
    cfg = tiny_config(family)  # gemma3: sliding window 8 < T, so chunks also skip keys left of the window
    params = init_params(cfg, 0)
    T = 24
    tokens = np.random.RandomState(0).randint(3, cfg.vocab_size, size=(2, T)).astype(np.int32)
    mask = np.ones((2, T), np.int32)
    mask[1, :5] = 0  # left padding on one row
    last = cfg.num_layers - 1
    ref = resid_post(cfg, params, tokens, mask, layers=(last,))[last]
    monkeypatch.setattr(dec, '_Q_CHUNK', 5)  # 5 chunks, the last one short
    jax.clear_caches()  # the chunk size is read at trace time: drop the compiled one-chunk version
    got = resid_post(cfg, params, tokens, mask, layers=(last,))[last]
    jax.clear_caches()
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-5)
