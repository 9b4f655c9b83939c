"""Real model: SmolLM2-135M at 50% unstructured on the built-in corpus: dense < Wanda < magnitude."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_smollm2_dense_below_wanda_below_magnitude_perplexity():
    from prunesae_jax.data.corpus import take_tokens, token_stream
    from prunesae_jax.models.zoo import load_zoo
    from prunesae_jax.pruning import delta_log_ppl, perplexity, prune

    cfg, params, tok = load_zoo('smollm2-135m')
    # Small on purpose (the test must stay under two minutes on 2 CPU cores): 8 x 256 calibration
    # tokens, ~1K evaluation tokens, window 256 / stride 128 instead of the paper's 1024 / 512.
    calib = take_tokens('builtin', tok, 8, 256, split='calibration', bos_id=cfg.bos_token_id)
    text = token_stream('builtin', tok, split='evaluation', max_tokens=1024)
    ppl = lambda p: perplexity(cfg, p, text, window=256, stride=128, batch_size=4)
    dense = ppl(params)
    wanda = prune(cfg, params, 'wanda', 0.5, calib_tokens=calib, progress=False)
    magnitude = prune(cfg, params, 'magnitude', 0.5, progress=False)
    ppl_w, ppl_m = ppl(wanda.params), ppl(magnitude.params)
    print(
        f'\nSmolLM2-135M, 50% unstructured, {text.size} eval tokens: dense PPL {dense:.2f}, '
        f'Wanda (per_row, sequential) {ppl_w:.2f} (dlogPPL {delta_log_ppl(ppl_w, dense):.3f}), '
        f'magnitude (per_matrix) {ppl_m:.2f} (dlogPPL {delta_log_ppl(ppl_m, dense):.3f})'
    )
    for r in (wanda.report, magnitude.report):
        assert abs(r['overall'] - 0.5) < 1e-6
    assert np.isfinite([dense, ppl_w, ppl_m]).all()
    assert dense < ppl_w < ppl_m
