"""Activation store / capture sizes and token ids checked at the call (direct library calls)."""

import numpy as np
import pytest

from prunesae_jax.errors import InputError
from prunesae_jax.models import init_params
from prunesae_jax.sae import ActivationStore, ArrayStore, capture_activations
from prunesae_jax.testing import tiny_config


def test_store_writer_and_reader_sizes(tmp_path):
    with pytest.raises(InputError, match=r'shard_tokens=0; accepted: an int >= 1'):
        ActivationStore.create(str(tmp_path / 's'), 8, 'float32', shard_tokens=0)
    store = ArrayStore(np.ones((10, 4), np.float32))
    with pytest.raises(InputError, match=r'n=-1; accepted'):
        store.sample(-1)
    with pytest.raises(InputError, match=r'batch_size=2.5'):
        store.batch(2.5, 0, 0)
    with pytest.raises(InputError, match=r'step=-1'):
        store.batch(2, 0, -1)
    assert store.sample(50).shape == (10, 4)  # more than the store: every row


def test_capture_checks_batch_size_and_token_ids(tmp_path):
    cfg = tiny_config('llama')
    params = init_params(cfg, 0)
    toks = np.random.RandomState(0).randint(3, cfg.vocab_size, size=(3, 6)).astype(np.int32)
    with pytest.raises(InputError, match=r'batch_size=0; accepted: an int >= 1'):
        capture_activations(cfg, params, toks, 1, batch_size=0)
    wide = toks.astype(np.int64)
    wide[2, 4] = 2**32 + 7  # an int32 cast would silently make it id 7
    with pytest.raises(InputError, match=r'token id 4294967303 at index \(2, 4\)'):
        capture_activations(cfg, params, wide, 1)
    with pytest.raises(InputError, match=r'token_batches shapes'):
        capture_activations(cfg, params, toks[0], 1)
    store = capture_activations(cfg, params, toks, 1, batch_size=100)  # larger than the data: one batch
    assert len(store) == 3 * 5


def test_damaged_store_is_an_input_error(tmp_path):
    w = ActivationStore.create(str(tmp_path / 's'), 4, 'float16', shard_tokens=8)
    w.append(np.ones((20, 4), np.float32))
    store = w.close()
    assert store.read(0, 20).shape == (20, 4)
    shard = tmp_path / 's' / 'shard_00001.npy'
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(InputError, match=r"shard_00001.npy' is missing or damaged"):
        ActivationStore(str(tmp_path / 's')).read(0, 20)
    (tmp_path / 's' / 'metadata.json').write_text('{"d_in": 4}')
    with pytest.raises(InputError, match=r'metadata .* is unreadable \(KeyError'):
        ActivationStore(str(tmp_path / 's'))
