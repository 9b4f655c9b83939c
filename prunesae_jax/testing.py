"""Tiny model configs shared by every test (random weights, seconds to run on CPU)."""

from __future__ import annotations

from prunesae_jax.errors import InputError
from prunesae_jax.models.config import FAMILIES, DecoderConfig

_BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    max_position_embeddings=256,
)

# Per family, the fields a tiny model of it sets beyond _BASE; the switches (norms, QK-norm,
# embedding scale) come from the family (models/config.py FAMILY_SWITCHES).
_FAMILY = {
    'llama': dict(
        family='llama',
        rope_theta=10_000.0,
        tie_word_embeddings=False,
        hidden_act='silu',
        layer_types=('full_attention',) * 4,
    ),
    'gemma2': dict(
        family='gemma2',
        rope_theta=10_000.0,
        sliding_window=8,
        layer_types=('sliding_attention', 'full_attention') * 2,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=24.0,
        tie_word_embeddings=True,
        hidden_act='gelu_pytorch_tanh',
    ),
    'gemma3_text': dict(
        family='gemma3_text',
        rope_theta=1_000_000.0,
        rope_local_theta=10_000.0,
        sliding_window=8,
        layer_types=('sliding_attention', 'sliding_attention', 'sliding_attention', 'full_attention'),
        query_pre_attn_scalar=16.0,
        tie_word_embeddings=True,
        hidden_act='gelu_pytorch_tanh',
    ),
}


def tiny_config(family: str = 'llama', **overrides) -> DecoderConfig:
    """A tiny DecoderConfig of a family: D=64, H=4, KV=2, hd=16, F=128, L=4, V=128, window 8.

    Overrides replace any field. Changing num_layers without layer_types repeats the family's
    pattern (gemma3_text: a global layer every 4th).
    """
    if family not in FAMILIES:
        raise InputError(f'family={family!r} is not supported; expected one of {FAMILIES}')
    kw = {**_BASE, **_FAMILY[family]}
    if 'num_layers' in overrides and 'layer_types' not in overrides:
        L = overrides['num_layers']
        pattern = kw['layer_types']
        kw['layer_types'] = tuple(pattern[i % len(pattern)] for i in range(L))
    kw.update(overrides)
    return DecoderConfig(**kw)
