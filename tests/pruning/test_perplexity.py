"""Strided perplexity (window, stride, BOS per window) against an unbatched NumPy loop."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from prunesae_jax.models import forward, init_params
from prunesae_jax.pruning.perplexity import delta_log_ppl, perplexity, strided_nll, window_spans
from prunesae_jax.testing import tiny_config


def ref_strided_nll(cfg, params, stream, window, stride, bos):
    """Hugging Face's strided-perplexity loop, one window at a time, BOS prepended to each window."""
    total, count, prev_end = 0.0, 0, 0
    n = len(stream)
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        trg = end - prev_end
        ids = np.concatenate([[bos], stream[begin:end]]).astype(np.int32)
        logits = np.asarray(forward(cfg, params, jnp.asarray(ids[None])), np.float64)[0]  # [L+1, V]
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        nll = -logp[np.arange(len(ids) - 1), ids[1:]]  # position p predicts token p + 1
        total += nll[-trg:].sum()
        count += trg
        prev_end = end
        if end == n:
            break
    return total, count


def test_window_spans_score_every_token_once():
    for n, w, s in [(100, 32, 16), (97, 32, 16), (10, 32, 16), (64, 32, 32), (33, 32, 8)]:
        spans = window_spans(n, w, s)
        scored = np.zeros(n, int)
        for b, e, k in spans:
            assert e - b <= w and k <= e - b
            scored[e - k : e] += 1
        assert (scored == 1).all()
    assert window_spans(2048, 1024, 512) == [(0, 1024, 1024), (512, 1536, 512), (1024, 2048, 512)]
    with pytest.raises(ValueError, match='stride'):
        window_spans(10, 8, 16)


def test_strided_nll_matches_unbatched_reference():
    cfg = tiny_config('gemma3_text')
    params = init_params(cfg, 2)
    stream = np.random.default_rng(0).integers(3, cfg.vocab_size, 150).astype(np.int32)
    # 3 does not divide the 9 windows (padded windows must not count); the last window is short
    total, count = strided_nll(cfg, params, stream, window=32, stride=16, batch_size=3, chunk=8)
    ref_total, ref_count = ref_strided_nll(cfg, params, stream, 32, 16, cfg.bos_token_id)
    assert count == ref_count == 150
    assert total == pytest.approx(ref_total, rel=1e-5)
    ppl = perplexity(cfg, params, stream, window=32, stride=16, batch_size=3, chunk=8)
    assert ppl == pytest.approx(math.exp(ref_total / ref_count), rel=1e-5)
    # a random tiny model is near uniform over its 128-token vocabulary
    assert 60 < ppl < 300
    assert delta_log_ppl(2 * ppl, ppl) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match='empty'):
        strided_nll(cfg, params, np.zeros(0, np.int32), window=32, stride=16)
    with pytest.raises(ValueError, match='positive'):
        delta_log_ppl(0.0, ppl)
