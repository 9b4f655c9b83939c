"""TrainConfig refuses settings that make no sense, at construction (direct calls)."""

import math

import pytest

from prunesae_jax.errors import InputError
from prunesae_jax.sae import TrainConfig


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
