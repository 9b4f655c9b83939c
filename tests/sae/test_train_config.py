"""TrainConfig refuses settings that make no sense, at construction (direct calls)."""

import math

import pytest

from prunesae_jax.errors import InputError
from prunesae_jax.sae import SAEConfig, TrainConfig


@pytest.mark.parametrize(
    'kw,match',
    [
        ({'lr': -1e-3}, r'lr=-0.001; accepted: a finite learning rate > 0'),  # gradient ascent
        ({'lr': 0.0}, r'lr=0.0; accepted'),
        ({'lr': math.nan}, r'lr=nan; accepted'),
        ({'warmup_steps': -5}, r'warmup_steps=-5; accepted: an int >= 0'),
        ({'adam_b1': 1.0}, r'adam_b1=1.0; accepted: 0 <= adam_b1 < 1'),
        ({'adam_b2': -0.1}, r'adam_b2=-0.1; accepted'),
        ({'eval_tokens': 0}, r'eval_tokens=0; accepted: a positive int'),
        ({'geometric_median_tokens': -1}, r'geometric_median_tokens=-1'),
        ({'batch_size': 256.5}, r'batch_size=256.5; accepted: a positive int'),
        ({'checkpoint_every': -1}, r'checkpoint_every=-1'),
        ({'decay_frac': math.nan}, r'decay_frac=nan'),
        ({'n_steps': True}, r'n_steps=True'),
    ],
)
def test_train_config_refuses(kw, match):
    with pytest.raises(InputError, match=match):
        TrainConfig(**kw)


def test_train_config_accepts_the_documented_range():
    t = TrainConfig(lr=None, warmup_steps=0, adam_b1=0.0, adam_b2=0.999, checkpoint_every=0, log_every=0)
    assert t.lr is None and t.warmup_steps == 0
    assert TrainConfig(lr=3e-4).lr == 3e-4


def test_state_bytes_is_the_formula_and_a_state_too_big_is_refused_in_one_line():
    import importlib

    train_mod = importlib.import_module('prunesae_jax.sae.train')
    for d, n, s in ((64, 256, 3), (40, 320, 1)):
        cfg, t = SAEConfig(d, n, k=8), TrainConfig(n_seeds=s, batch_size=32, n_steps=4)
        assert train_mod.state_bytes(cfg, t) == 4 * s * (3 * (2 * n * d + n + d) + 2 * n + 2) + 4
    cfg, t = SAEConfig(64, 256, k=8), TrainConfig(n_seeds=4, batch_size=32, n_steps=4)
    need = train_mod.state_bytes(cfg, t) + 32 * 64 * 4
    train_mod.check_fits(cfg, t, available=need)  # exactly enough
    with pytest.raises(InputError, match=r'n_seeds=4 SAEs of 256 latents x d_in=64 need .* GiB available; accepted'):
        train_mod.check_fits(cfg, t, available=need - 1)
