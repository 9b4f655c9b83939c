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
from prunesae_jax.models.convert import export_hf_folder, from_hf_state_dict, from_transformers, load, load_hf_folder
from prunesae_jax.models.gguf import load_gguf, read_gguf
from prunesae_jax.models.zoo import ZOO, load_zoo

__all__ = [
    'PRUNABLE',
    'ZOO',
    'export_hf_folder',
    'from_hf_state_dict',
    'from_transformers',
    'load',
    'load_gguf',
    'load_hf_folder',
    'load_zoo',
    'read_gguf',
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
