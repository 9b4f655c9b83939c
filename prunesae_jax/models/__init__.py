"""Decoder models: config, the single NNX decoder (as pure functions over params), conversion."""

from prunesae_jax.models.config import PRUNABLE, DecoderConfig
from prunesae_jax.models.decoder import (
    Decoder,
    block,
    block_linear_inputs,
    embed,
    forward,
    init_params,
    resid_post,
    unembed,
)

__all__ = [
    'PRUNABLE',
    'Decoder',
    'DecoderConfig',
    'block',
    'block_linear_inputs',
    'embed',
    'forward',
    'init_params',
    'resid_post',
    'unembed',
]
