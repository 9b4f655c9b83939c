"""The study's inputs, read and checked before the workdir is touched: the model and its layer, the
pretrained transfer dictionary, and the token arrays of every split.

Errors name the config key that chose the input (config.model, config.transfer.path,
config.data.<split>.source) and what is accepted, as ConfigError (an InputError).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np

from prunesae_jax import sharding
from prunesae_jax.errors import InputError
from prunesae_jax.models.load import LoadedModel, load_model
from prunesae_jax.study.config import (
    ConfigError,
    n_sequences,
    sae_config,
    train_config,
    validate_layer,
    validate_nm_widths,
)

__all__ = ['load', 'pretrained_dictionary', 'read_corpus', 'tokens_spec', 'read_tokens']


def load(config) -> tuple[LoadedModel, int, Any]:
    """The model, its resid_post layer and the pretrained transfer dictionary, all checked."""
    model = load_model(config.model, config.dtype, config.seed)
    cfg = model.cfg
    layer = validate_layer(config, cfg.num_layers, cfg.hidden_size)
    validate_nm_widths(
        config,
        {
            'hidden_size': cfg.hidden_size,
            'num_heads x head_dim': cfg.num_heads * cfg.head_dim,
            'intermediate_size': cfg.intermediate_size,
        },
    )
    mesh = sharding.sae_mesh(config.mesh.seed, config.mesh.data)  # a mesh that does not fit fails here
    # So does an SAE train state larger than one device, before anything is computed.
    from prunesae_jax.sae.train import check_fits  # pylint: disable=g-import-not-at-top

    check_fits(sae_config(config, cfg.hidden_size), train_config(config, config.sae.n_tokens), mesh)
    dictionary = None
    if config.transfer.source == 'pretrained':
        dictionary = pretrained_dictionary(config, cfg.hidden_size)
    return model, layer, dictionary


def pretrained_dictionary(config, d_model: int):
    """(SAEConfig, params, name) of transfer.path (in transfer.repo, or local), d_in checked."""
    from prunesae_jax.sae.io import load_sae  # pylint: disable=g-import-not-at-top

    t = config.transfer
    path = os.path.expanduser(t.path)
    if t.repo:
        from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top

        try:
            path = os.path.join(
                snapshot_download(t.repo, allow_patterns=[f'{t.path.rstrip("/")}*', f'{t.path.rstrip("/")}/*']), t.path
            )
        except Exception as e:  # pylint: disable=broad-except  # offline, no such repo, ...
            first = (str(e).strip().splitlines() or [''])[0][:160]
            raise ConfigError(
                f'config.transfer.repo={t.repo!r} could not be fetched ({type(e).__name__}: '
                f'{first}); accepted: a hub repo reachable from here (or in the HF '
                "cache), or transfer.repo='' with a local transfer.path"
            ) from None
    try:
        sae_cfg, params = load_sae(path)
    except InputError:
        raise
    except Exception as e:  # pylint: disable=broad-except  # missing, garbled or foreign files there
        raise ConfigError(
            f'config.transfer.path={t.path!r} holds no readable dictionary ({type(e).__name__}: '
            f'{e}); accepted: a SAELens, Gemma Scope or sparsify SAE'
        ) from None
    if sae_cfg.d_in != d_model:
        raise ConfigError(
            f'config.transfer.path={t.path!r} has d_in={sae_cfg.d_in}; accepted: a '
            f'dictionary for d_model={d_model} ({config.model})'
        )
    return sae_cfg, {k: jax.numpy.asarray(v) for k, v in params.items()}, f'{t.repo}/{t.path}'.strip('/')


def read_corpus(config, which: str, fn, *args, **kwargs):
    """fn(corpus of config.data.<which>, *args, **kwargs), with a corpus that is no UTF-8 text or
    needs a package that is not installed reported as a ConfigError naming config.data.<which>."""
    from prunesae_jax.data import CorpusSpec  # pylint: disable=g-import-not-at-top

    c = config.data[which]
    try:
        return fn(
            CorpusSpec(
                source=c.source, text_field=c.text_field, hf_config=c.hf_config or None, hf_split=c.hf_split or None
            ),
            *args,
            **kwargs,
        )
    except UnicodeDecodeError as e:
        raise ConfigError(
            f'config.data.{which}.source={c.source!r} is not UTF-8 text ({e.reason}: byte '
            f'{e.object[e.start : e.start + 1]!r} at offset {e.start} of a chunk); '
            'accepted: UTF-8 .txt / .jsonl files (convert with iconv)'
        ) from None
    except ImportError as e:  # .parquet without pyarrow, an HF dataset without `datasets`
        raise ConfigError(
            f'config.data.{which}.source={c.source!r} cannot be read here: {e}; accepted: a '
            'source whose reader is installed (.txt / .jsonl need none)'
        ) from None
    except InputError as e:  # too few tokens, a missing text field, ...: say which source
        if str(e).startswith('config.'):
            raise
        raise ConfigError(f'config.data.{which}.source={c.source!r}: {e}') from None


def tokens_spec(config) -> dict:
    """What decides the token arrays: the data and calibration sections, the perplexity cap and the
    SAE / held-out row counts (n_train rows of sae.seq_len tokens hold sae.n_tokens SAE tokens)."""
    sae, ana = config.sae, config.analysis
    return {
        'data': config.data.to_dict(),
        'calibration': config.calibration.to_dict(),
        'ppl_max_tokens': config.ppl.max_tokens,
        'n_train': n_sequences(sae.n_tokens, sae.seq_len),
        'n_held': n_sequences(max(ana.transfer_tokens, ana.causal_tokens), sae.seq_len),
        'seq_len': sae.seq_len,
    }


def read_tokens(config, tokenizer, bos_id: int, n_train: int, n_held: int) -> dict[str, np.ndarray]:
    """The study's token arrays: calibration rows, the perplexity stream (no BOS), SAE training rows
    and held-out rows (BOS first), each from its config.data split."""
    from prunesae_jax import data  # pylint: disable=g-import-not-at-top

    splits, cal, seq_len = config.data, config.calibration, config.sae.seq_len
    read = functools.partial(read_corpus, config)  # names config.data.<which> in errors
    return {
        'calibration': read(
            'calibration',
            data.take_tokens,
            tokenizer,
            cal.n_samples,
            cal.seq_len,
            split=splits.calibration.split,
            bos_id=bos_id,
        ),
        'eval_stream': read(
            'eval', data.token_stream, tokenizer, split=splits.eval.split, max_tokens=config.ppl.max_tokens or None
        ),
        'train': read('train', data.take_tokens, tokenizer, n_train, seq_len, split=splits.train.split, bos_id=bos_id),
        'heldout': read('eval', data.take_tokens, tokenizer, n_held, seq_len, split=splits.eval.split, bos_id=bos_id),
    }
