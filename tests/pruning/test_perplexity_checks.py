"""Perplexity inputs checked against the text and the model they apply to (direct library calls)."""

import numpy as np
import pytest

from prunesae_jax.errors import InputError
from prunesae_jax.models import init_params
from prunesae_jax.pruning.perplexity import strided_windows, window_nll
from prunesae_jax.testing import tiny_config


@pytest.fixture(scope='module')
def model():
    cfg = tiny_config('llama')  # vocab_size 128, bos 1, pad 0
    return cfg, init_params(cfg, 3)


def _text(n=30, seed=0):
    return np.random.RandomState(seed).randint(3, 128, size=n).astype(np.int32)


def test_window_longer_than_the_text_is_clamped_to_it(model):
    # A window padded to window + 1 whatever the text length ran the model on a million positions.
    inputs, targets, weights = strided_windows(_text(10), 1, window=10**6, stride=512)
    assert inputs.shape == targets.shape == weights.shape == (1, 11)
    assert weights.sum() == 10 and inputs[0, 0] == 1
    cfg, params = model
    text = _text(30)
    nll_big, n_big = window_nll(cfg, params, text, window=4096, stride=2048, batch_size=2)
    nll_fit, n_fit = window_nll(cfg, params, text, window=30, stride=30, batch_size=2)
    np.testing.assert_allclose(nll_big, nll_fit, rtol=1e-5)
    assert n_big.tolist() == n_fit.tolist() == [30]


def test_token_ids_outside_the_vocabulary_are_named_not_reported_as_non_finite(model):
    cfg, params = model
    text = _text()
    text[17] = cfg.vocab_size + 5
    with pytest.raises(InputError, match=r'token id 133 at index \(17,\); accepted: 0 <= id < vocab_size=128'):
        window_nll(cfg, params, text, window=16, stride=8)
    text[17] = -3  # would silently wrap around to the end of the vocabulary
    with pytest.raises(InputError, match=r'token id -3'):
        window_nll(cfg, params, text, window=16, stride=8)
    with pytest.raises(InputError, match=r'bos_token_id=128; accepted'):
        window_nll(cfg, params, _text(), window=16, stride=8, bos_token_id=128)


@pytest.mark.parametrize(
    'kw,match',
    [
        ({'batch_size': 0}, r'batch_size=0; accepted: a positive int'),
        ({'chunk': -4}, r'chunk=-4; accepted: a positive int'),
        ({'window': 16.0}, r'window=16.0; accepted: a positive int'),
        ({'stride': 32}, r'window=16, stride=32'),
    ],
)
def test_size_arguments_are_checked(model, kw, match):
    cfg, params = model
    args = {**dict(window=16, stride=8, batch_size=2), **kw}
    with pytest.raises(InputError, match=match):
        window_nll(cfg, params, _text(), **args)


def test_a_config_pad_id_outside_the_vocabulary_pads_with_bos(model):
    cfg, params = model
    text = _text(21)  # 21 tokens, window 16 stride 8: the last window is padded
    ref, n_ref = window_nll(cfg, params, text, window=16, stride=8)
    nll, n = window_nll(cfg.replace(pad_token_id=-1), params, text, window=16, stride=8)
    np.testing.assert_allclose(nll, ref, rtol=1e-6)
    assert n.tolist() == n_ref.tolist()
