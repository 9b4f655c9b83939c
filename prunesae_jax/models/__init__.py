"""Decoder models: config, the decoder (pure functions over a params dict), losses, conversion."""

from prunesae_jax.models.config import FAMILIES, PRUNABLE, DecoderConfig
from prunesae_jax.models.convert import export_hf_folder, from_hf_state_dict, from_transformers, load, load_hf_folder
from prunesae_jax.models.decoder import (
    block,
    block_linear_inputs,
    embed,
    forward,
    init_params,
    resid_post,
    unembed,
)
from prunesae_jax.models.gguf import load_gguf, read_gguf
from prunesae_jax.models.zoo import ZOO, ZOO_NAMES, load_zoo

__all__ = [
    # config
    'DecoderConfig',
    'FAMILIES',
    'PRUNABLE',
    # decoder
    'block',
    'block_linear_inputs',
    'embed',
    'forward',
    'init_params',
    'resid_post',
    'unembed',
    # checkpoints: HF folders and state dicts, GGUF files, the zoo
    'load',
    'load_hf_folder',
    'from_hf_state_dict',
    'from_transformers',
    'export_hf_folder',
    'load_gguf',
    'read_gguf',
    'ZOO',
    'ZOO_NAMES',
    'load_zoo',
]
