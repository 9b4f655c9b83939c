"""Family differences are DecoderConfig switches: the family fills them, the decoder reads only them."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from prunesae_jax.errors import InputError
from prunesae_jax.models import export_hf_folder, forward, init_params, resid_post
from prunesae_jax.models.config import FAMILIES, FAMILY_SWITCHES, SWITCHES, DecoderConfig
from prunesae_jax.models.decoder import layer_param_names
from prunesae_jax.testing import tiny_config


@pytest.mark.parametrize('family', FAMILIES)
def test_family_fills_the_switches_and_hf_round_trips_them(family):
    cfg = tiny_config(family)
    for name, value in FAMILY_SWITCHES[family].items():
        assert getattr(cfg, name) == value, name
    assert all(isinstance(getattr(cfg, name), bool) for name in SWITCHES)
    back = DecoderConfig.from_hf(cfg.to_hf_dict())
    assert back == cfg and hash(back) == hash(cfg)


def test_an_explicit_switch_overrides_the_family():
    cfg = tiny_config('gemma2', qk_norm=True)
    assert cfg.qk_norm and cfg.post_norms
    assert {'q_norm', 'k_norm'} <= set(layer_param_names(cfg))
    assert 'post_attn_norm' not in layer_param_names(tiny_config('gemma2', post_norms=False))


@pytest.mark.parametrize('family', ['gemma2', 'gemma3_text'])
def test_the_decoder_reads_switches_not_the_family_name(family):
    """A config named llama with a gemma's switches is that gemma, bit for bit."""
    cfg = tiny_config(family)
    as_llama = dataclasses.replace(cfg, family='llama')
    assert all(getattr(as_llama, n) == getattr(cfg, n) for n in SWITCHES)
    assert as_llama.rope_local_theta == cfg.rope_local_theta
    params = init_params(cfg, 0)
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, size=(2, 20)).astype(np.int32))
    np.testing.assert_array_equal(
        np.asarray(forward(as_llama, params, tokens)), np.asarray(forward(cfg, params, tokens))
    )
    last = cfg.num_layers - 1
    np.testing.assert_array_equal(
        np.asarray(resid_post(as_llama, params, tokens, layers=last)[last]),
        np.asarray(resid_post(cfg, params, tokens, layers=last)[last]),
    )


@pytest.mark.parametrize(
    'family, change, match',
    [
        (
            'gemma3_text',
            {'attn_logit_softcapping': 50.0},
            r'attn_logit_softcapping=50.0 cannot be exported as Gemma3ForCausalLM, which has no such setting; '
            r"accepted: None for family='gemma3_text'",
        ),
        (
            'llama',
            {'qk_norm': True},
            r"qk_norm=True cannot be exported as LlamaForCausalLM; accepted: qk_norm=False for family='llama'",
        ),
        (
            'gemma2',
            {'norm_plus_one': False},
            r'norm_plus_one=False cannot be exported as Gemma2ForCausalLM; accepted: norm_plus_one=True',
        ),
        ('llama', {'final_logit_softcapping': 30.0}, r'final_logit_softcapping=30.0 cannot be exported'),
    ],
)
def test_export_refuses_switches_the_hf_architecture_cannot_state(tmp_path, family, change, match):
    cfg = tiny_config(family, **change)  # a valid model: it runs
    params = init_params(cfg, 0)
    assert np.isfinite(np.asarray(forward(cfg, params, np.full((1, 4), 3, np.int32)))).all()
    with pytest.raises(InputError, match=match) as e:
        export_hf_folder(cfg, params, str(tmp_path / 'out'))
    assert '\n' not in str(e.value)
    assert not (tmp_path / 'out').exists()
