"""A model by name, ready to run: its config, params cast to one dtype, its tokenizer, a cache key.

`load_model(spec, dtype, seed)` accepts what the study's `config.model` accepts:

- 'tiny:<family>': a randomly initialised tiny decoder (prunesae_jax.testing.tiny_config) seeded by
  `seed`, with `ByteTokenizer`; for tests and demos, no download;
- a zoo name (models/zoo.py), a local HF folder, a .gguf file or a hub id, with its own tokenizer.

`key` identifies the weights and the tokenizer (a stable hash of the spec, or of the absolute path of
a local checkpoint, and the dtype), so that every cached stage computed from the model names it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from prunesae_jax.errors import InputError
from prunesae_jax.io import stable_hash
from prunesae_jax.models.config import DecoderConfig

__all__ = ['ByteTokenizer', 'LoadedModel', 'cast_params', 'load_model', 'load_tokenizer', 'TOKENIZER_FILES']

# A local HF folder has a tokenizer when it holds one of these.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json', 'vocab.json', 'spiece.model')


class ByteTokenizer:
    """UTF-8 bytes folded into a tiny vocabulary, for the random 'tiny:<family>' models.

    Ids 0..2 are pad / BOS / EOS (prunesae_jax.testing.tiny_config's special ids); byte b maps to
    3 + b % (vocab_size - 3).
    """

    def __init__(self, vocab_size: int, bos_token_id: int = 1):
        if vocab_size < 4:
            raise InputError(f'vocab_size={vocab_size}; accepted: >= 4')
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        del add_special_tokens
        return [3 + b % (self.vocab_size - 3) for b in text.encode('utf-8')]


@dataclasses.dataclass
class LoadedModel:
    """A loaded model: spec as given, cfg, params (cast), tokenizer and the key of its weights."""

    spec: str
    cfg: DecoderConfig
    params: Any
    tokenizer: Any
    key: str


def cast_params(params, dtype: str):
    """params with every floating leaf cast to dtype (integer leaves kept)."""
    dt = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(dt) if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


def load_model(spec: str, dtype: str = 'float32', seed: int = 0) -> LoadedModel:
    """The model `spec` (see the module docstring) with its params cast to dtype.

    seed only matters for 'tiny:<family>' (its random init). Raises InputError for a checkpoint,
    folder or tokenizer that cannot be read.
    """
    if spec.startswith('tiny:'):
        from prunesae_jax.models import decoder  # pylint: disable=g-import-not-at-top
        from prunesae_jax.testing import tiny_config  # pylint: disable=g-import-not-at-top

        cfg = dataclasses.replace(tiny_config(spec[5:]), dtype=dtype)
        params = cast_params(decoder.init_params(cfg, seed), dtype)
        tokenizer = ByteTokenizer(cfg.vocab_size, cfg.bos_token_id)
        key = {'tiny': spec, 'seed': seed, 'dtype': dtype}
    else:
        from prunesae_jax.models import convert, zoo  # pylint: disable=g-import-not-at-top

        if spec in zoo.ZOO:
            cfg, params, tokenizer = zoo.load_zoo(spec, dtype=dtype)
        else:
            cfg, params = convert.load(spec, dtype=dtype)
            tokenizer = load_tokenizer(spec)
        cfg = dataclasses.replace(cfg, dtype=dtype)
        params = cast_params(params, dtype)
        local = os.path.expanduser(spec)
        key = {'model': os.path.abspath(local) if os.path.exists(local) else spec, 'dtype': dtype}
    return LoadedModel(spec, cfg, params, tokenizer, stable_hash(key))


def load_tokenizer(spec: str):
    """The tokenizer of a local HF folder, a .gguf file or a hub id.

    InputError naming spec when a folder has none of TOKENIZER_FILES or the tokenizer cannot be
    loaded (transformers raises many error types; the first line of its message is kept).
    """
    from prunesae_jax.models import convert  # pylint: disable=g-import-not-at-top

    path = os.path.expanduser(spec)
    accepted = (
        'accepted: a model folder with its tokenizer files ('
        + ', '.join(TOKENIZER_FILES)
        + '), a .gguf file with its tokenizer, or a hub id'
    )
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise InputError(f'model={spec!r} has no tokenizer (none of {", ".join(TOKENIZER_FILES)}); {accepted}')
    try:
        return convert.load_tokenizer(path)
    except InputError:
        raise
    except Exception as e:  # pylint: disable=broad-except  # transformers' many error types
        first = (str(e).strip().splitlines() or [''])[0][:200]
        raise InputError(
            f'model={spec!r}: its tokenizer cannot be loaded ({type(e).__name__}: {first}); {accepted}'
        ) from None
