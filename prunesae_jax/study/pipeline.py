"""run(config, workdir): the study's grid, stage by stage, cached and resumable.

For the model: load -> tokens -> for each condition (dense first, then method x sparsity):
prune -> perplexity -> capture resid_post activations to a store -> train S seeds of SAEs in
one vmapped run -> measures RQ1-RQ5 against the dense condition. Each stage is cached under
workdir/stages/<stage>/<key>/ (see workdir.py); the key hashes the config fields that decide
the stage and the keys of the stages it reads, so editing e.g. `analysis.tau` recomputes only
the measures. Every number in results.json is read back from the cache, so a resumed run
writes the same bytes as an uninterrupted one.

Choices where the paper is silent (documented here and in the report):
- RQ1/RQ2 use MNN matching of decoder rows at tau; dense "survival" (dense vs dense) is the seed
  stability over distinct seed pairs, i.e. the seed floor.
- RQ3 splices the fixed dictionary's reconstruction into every position but BOS (BOS
  activations are outliers no SAE is trained on); the zero-ablation baseline zeroes the same
  positions. Jaccard compares the dictionary's active sets on the dense and the pruned model,
  token by token, on the same held-out tokens.
- RQ5 measures each dense feature's causal effect once, in the dense model (dense SAE seed 0,
  reconstruction error kept so the clean loss is the model's), and correlates it per condition
  with the feature's survival (its max cosine to that condition's SAEs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from prunesae_jax.errors import InputError, NonFiniteError
from prunesae_jax.models.loss import tail_nll
from prunesae_jax.study import report as report_lib
from prunesae_jax.study.config import (
    ConfigError,
    n_sequences,
    validate,
    validate_layer,
    validate_nm_widths,
)
from prunesae_jax.study.workdir import (
    StageCache,
    atomic_write_json,
    atomic_write_npz,
    crash_point,
    hold_workdir,
    provenance,
    set_activity,
    stable_hash,
    to_jsonable,
    write_config,
)

__all__ = ['run', 'StudyInterrupted', 'ByteTokenizer', 'conditions_of', 'condition_seed', 'STOP_ENV']

# Bumped whenever the measures stage's output changes, so older cached measures are recomputed.
MEASURES_VERSION = 3
# For tests and demos: stop (as if killed) after this many finished conditions.
STOP_ENV = 'PRUNESAE_STOP_AFTER_CONDITIONS'


class StudyInterrupted(RuntimeError):
    """Raised when $PRUNESAE_STOP_AFTER_CONDITIONS stops a run early; re-run to resume."""


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
class _Model:
    spec: str
    cfg: Any
    params: Any
    tokenizer: Any
    key: str  # identifies the weights and tokenizer in stage keys
    layer: int
    dictionary: Any = None  # transfer.source='pretrained': (SAEConfig, params, name), loaded up front


def conditions_of(config) -> list[tuple[str, float]]:
    """[('dense', 0.0), (method, sparsity), ...]: dense first, then methods x sorted sparsities > 0."""
    sparsities = sorted(float(s) for s in config.pruning.sparsities if float(s) > 0)
    return [('dense', 0.0)] + [(m, s) for m in config.pruning.methods for s in sparsities]


def _progress(config, iterable, **kw):
    if not config.progress:
        return iterable
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kw)


def _say(config, line: str) -> None:
    """One line of progress: above the progress bars when they are on, else to the log."""
    if config.progress:
        from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
        tqdm.write(line, file=sys.stderr)
    else:
        logging.info('%s', line)


class _Timings(dict):
    """Wall-clock seconds per stage of this invocation, for timings.json (not results.json)."""

    def add(self, name: str, seconds: float) -> None:
        self[name] = round(self.get(name, 0.0) + seconds, 3)


# --------------------------------------------------------------------------- model and tokens

def _cast_params(params, dtype: str):
    dt = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(dt) if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)
        else x, params)


def _load_model(config) -> _Model:
    """(cfg, params, tokenizer) of config.model, cast to config.dtype."""
    from prunesae_jax.models import decoder  # pylint: disable=g-import-not-at-top
    spec = config.model
    if spec.startswith('tiny:'):
        from prunesae_jax.testing import tiny_config  # pylint: disable=g-import-not-at-top
        cfg = dataclasses.replace(tiny_config(spec[5:]), dtype=config.dtype)
        params = _cast_params(decoder.init_params(cfg, config.seed), config.dtype)
        tok = ByteTokenizer(cfg.vocab_size, cfg.bos_token_id)
        key = {'tiny': spec, 'seed': config.seed, 'dtype': config.dtype}
    else:
        from prunesae_jax.models import convert  # pylint: disable=g-import-not-at-top
        from prunesae_jax.study.config import MODEL_ZOO  # pylint: disable=g-import-not-at-top
        if spec in MODEL_ZOO:
            from prunesae_jax.models.zoo import load_zoo  # pylint: disable=g-import-not-at-top
            cfg, params, tok = load_zoo(spec, dtype=config.dtype)
        else:
            cfg, params = convert.load(spec, dtype=config.dtype)
            tok = _hf_tokenizer(spec)
        cfg = dataclasses.replace(cfg, dtype=config.dtype)
        params = _cast_params(params, config.dtype)
        key = {'model': os.path.abspath(os.path.expanduser(spec)) if os.path.exists(
            os.path.expanduser(spec)) else spec, 'dtype': config.dtype}
    layer = validate_layer(config, cfg.num_layers, cfg.hidden_size)
    validate_nm_widths(config, {'hidden_size': cfg.hidden_size,
                                'num_heads x head_dim': cfg.num_heads * cfg.head_dim,
                                'intermediate_size': cfg.intermediate_size})
    _mesh(config)  # a config.mesh that does not fit the devices fails here, not at the first SAE
    # A pretrained transfer dictionary is loaded and checked against d_model before any work.
    dictionary = None
    if config.transfer.source == 'pretrained':
        dictionary = _pretrained_dictionary(config, cfg, spec)
    return _Model(spec, cfg, params, tok, stable_hash(key), layer, dictionary)


_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json', 'vocab.json',
                    'spiece.model')


def _hf_tokenizer(spec: str):
    """The tokenizer of a local HF folder, a .gguf file or a hub id; InputError naming config.model
    when there is none or it cannot be loaded."""
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    path = os.path.expanduser(spec)
    accepted = ('accepted: a model folder with its tokenizer files (' + ', '.join(_TOKENIZER_FILES)
                + '), a .gguf file with its tokenizer, or a hub id')
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise ConfigError(f'config.model={spec!r} has no tokenizer (none of {", ".join(_TOKENIZER_FILES)});'
                          f' {accepted}')
    try:
        if path.lower().endswith('.gguf'):
            return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                 gguf_file=os.path.basename(path))
        if not os.path.isdir(path):
            from prunesae_jax.models.convert import download_hub  # pylint: disable=g-import-not-at-top
            path = download_hub(spec)
        return AutoTokenizer.from_pretrained(path)
    except InputError:
        raise
    except Exception as e:  # pylint: disable=broad-except  # transformers' many error types
        first = (str(e).strip().splitlines() or [''])[0][:200]
        raise ConfigError(f'config.model={spec!r}: its tokenizer cannot be loaded ({type(e).__name__}: '
                          f'{first}); {accepted}') from None


def _corpus(source_cfg) -> Any:
    from prunesae_jax.data import CorpusSpec  # pylint: disable=g-import-not-at-top
    return CorpusSpec(source=source_cfg.source, text_field=source_cfg.text_field,
                      hf_config=source_cfg.hf_config or None, hf_split=source_cfg.hf_split or None)


def _read_corpus(config, which: str, fn, *args, **kwargs):
    """fn(corpus of config.data.<which>, *args, **kwargs), with a corpus that is no UTF-8 text or
    needs a package that is not installed reported as InputError naming config.data.<which>."""
    src = config.data[which].source
    try:
        return fn(_corpus(config.data[which]), *args, **kwargs)
    except UnicodeDecodeError as e:
        raise ConfigError(f'config.data.{which}.source={src!r} is not UTF-8 text ({e.reason}: byte '
                          f'{e.object[e.start:e.start + 1]!r} at offset {e.start} of a chunk); '
                          'accepted: UTF-8 .txt / .jsonl files (convert with iconv)') from None
    except ImportError as e:  # .parquet without pyarrow, an HF dataset without `datasets`
        raise ConfigError(f'config.data.{which}.source={src!r} cannot be read here: {e}; accepted: a '
                          'source whose reader is installed (.txt / .jsonl need none)') from None
    except InputError as e:  # too few tokens, a missing text field, ...: say which source
        if str(e).startswith('config.'):
            raise
        raise ConfigError(f'config.data.{which}.source={src!r}: {e}') from None


def _n_seqs(n_tokens: int, seq_len: int) -> int:
    # BOS is never an SAE training or measurement token: seq_len - 1 usable tokens per row.
    return n_sequences(n_tokens, seq_len)


def _tokens_stage(config, model: _Model, cache: StageCache, timings: _Timings) -> tuple[str, dict]:
    """Calibration rows, the perplexity stream, SAE training rows and held-out rows, as int32."""
    from prunesae_jax import data  # pylint: disable=g-import-not-at-top
    sae, ana = config.sae, config.analysis
    n_train = _n_seqs(sae.n_tokens, sae.seq_len)
    n_held = _n_seqs(max(ana.transfer_tokens, ana.causal_tokens), sae.seq_len)
    spec = {'data': config.data.to_dict(), 'calibration': config.calibration.to_dict(),
            'ppl_max_tokens': config.ppl.max_tokens, 'n_train': n_train, 'n_held': n_held,
            'seq_len': sae.seq_len}
    key = cache.key('tokens', spec, [model.key])
    if not cache.done('tokens', key):
        t0 = time.perf_counter()
        tok, bos = model.tokenizer, model.cfg.bos_token_id
        read = functools.partial(_read_corpus, config)  # names config.data.<which> in errors
        out = {
            'calibration': read('calibration', data.take_tokens, tok,
                                config.calibration.n_samples, config.calibration.seq_len,
                                split=config.data.calibration.split, bos_id=bos),
            'eval_stream': read('eval', data.token_stream, tok, split=config.data.eval.split,
                                max_tokens=config.ppl.max_tokens or None),
            'train': read('train', data.take_tokens, tok, n_train, sae.seq_len,
                          split=config.data.train.split, bos_id=bos),
            'heldout': read('eval', data.take_tokens, tok, n_held, sae.seq_len,
                            split=config.data.eval.split, bos_id=bos),
        }
        with cache.writing('tokens', key, spec) as tmp:
            atomic_write_npz(tmp / 'tokens.npz', out)
        timings.add('tokens', time.perf_counter() - t0)
    return key, cache.read_npz('tokens', key, 'tokens.npz')


# --------------------------------------------------------------------------- prune, ppl, capture

def _group_args(config, method: str) -> dict[str, Any]:
    group = config.pruning.group[method] if method in config.pruning.group else ''
    if ':' in group:
        n, m = group.split(':')
        return {'group': None, 'nm': (int(n), int(m))}
    return {'group': group or None, 'nm': None}


def _prune_stage(config, model: _Model, method: str, sparsity: float, tokens_key: str,
                 tokens: dict, cache: StageCache, timings: _Timings) -> tuple[str, Any, dict]:
    """(key, pruned params, sparsity report) of one condition; the dense condition is the model."""
    if method == 'dense':
        return model.key, model.params, {'overall': 0.0, 'per_kind': {'attention': 0.0, 'mlp': 0.0}}
    from prunesae_jax import pruning  # pylint: disable=g-import-not-at-top
    args = _group_args(config, method)
    spec = {'method': method, 'sparsity': sparsity, **args,
            'block_sequential': config.pruning.block_sequential}
    upstream = [model.key] + ([tokens_key] if method != 'magnitude' else [])
    key = cache.key('prune', spec, upstream)
    if not cache.done('prune', key):
        t0 = time.perf_counter()
        res = pruning.prune(model.cfg, model.params, method,
                            None if args['nm'] else sparsity, group=args['group'], nm=args['nm'],
                            calib_tokens=tokens['calibration'] if method != 'magnitude' else None,
                            sequential=config.pruning.block_sequential, progress=config.progress,
                            batch_size=max(1, min(8, config.calibration.n_samples)))
        with cache.writing('prune', key, spec) as tmp:
            pruning.save_masks(tmp / 'masks.npz', res.masks)
            if method == 'sparsegpt':  # SparseGPT also updates the kept weights
                atomic_write_npz(tmp / 'weights.npz', _prunable_weights(res.params))
            report = {k: v for k, v in res.report.items() if k != 'seconds'}
            atomic_write_json(tmp / 'report.json', report)
        timings.add('prune', time.perf_counter() - t0)
    masks = pruning.load_masks(cache.path('prune', key) / 'masks.npz', model.params)
    params = model.params
    if method == 'sparsegpt':
        params = _with_prunable_weights(params, cache.read_npz('prune', key, 'weights.npz'))
    return key, _apply_masks_shared(params, masks), cache.read_json('prune', key, 'report.json')


def _apply_masks_shared(params, masks):
    """pruning.apply_masks, with every leaf that has no mask kept as the same array.

    Only the masked leaves go through the jit: a jit's pass-through outputs are fresh buffers, so
    each condition would otherwise hold its own copy of the embedding and norms (0.7 GB for
    Gemma 3 270M in float32).
    """
    from prunesae_jax import pruning  # pylint: disable=g-import-not-at-top
    none = lambda x: x is None
    masked_only = jax.tree.map(lambda m, p: None if m is None else p, masks, params, is_leaf=none)
    masked = jax.jit(pruning.apply_masks)(masked_only, masks)
    return jax.tree.map(lambda m, p, q: p if m is None else q, masks, params, masked, is_leaf=none)


def _prunable_weights(params) -> dict[str, np.ndarray]:
    from prunesae_jax.models.config import PRUNABLE  # pylint: disable=g-import-not-at-top
    return {f'{i}.{n}': np.asarray(lp[n]) for i, lp in enumerate(params['layers']) for n in PRUNABLE}


def _with_prunable_weights(params, weights: dict[str, np.ndarray]):
    layers = []
    for i, lp in enumerate(params['layers']):
        lp = dict(lp)
        for name in list(lp):
            if f'{i}.{name}' in weights:
                lp[name] = jnp.asarray(weights[f'{i}.{name}'], lp[name].dtype)
        layers.append(lp)
    return {**params, 'layers': layers}


def _ppl_stage(config, model: _Model, params, prune_key: str, tokens_key: str, tokens: dict,
               cache: StageCache, timings: _Timings) -> dict:
    from prunesae_jax.analysis import stats  # pylint: disable=g-import-not-at-top
    from prunesae_jax.pruning.perplexity import window_nll  # pylint: disable=g-import-not-at-top
    ana = config.analysis
    spec = {'ppl': config.ppl.to_dict(), 'ci': [ana.n_bootstrap, ana.ci, ana.seed]}
    key = cache.key('ppl', spec, [prune_key, tokens_key])
    if not cache.done('ppl', key):
        t0 = time.perf_counter()
        nll, count = window_nll(model.cfg, params, tokens['eval_stream'], window=config.ppl.window,
                                stride=config.ppl.stride, batch_size=config.ppl.batch_size,
                                bos_token_id=model.cfg.bos_token_id)
        # The interval resamples the windows (each scores a disjoint stretch of the text).
        iv = stats.bootstrap_ci(np.stack([nll, count], 1),
                                lambda a: math.exp(a[:, 0].sum() / a[:, 1].sum()),
                                n_boot=max(ana.n_bootstrap, 1), ci=ana.ci, seed=ana.seed)
        with cache.writing('ppl', key, spec) as tmp:
            atomic_write_json(tmp / 'ppl.json', {'nll': float(nll.sum()), 'n_tokens': int(count.sum()),
                                                 'n_windows': int(nll.size),
                                                 'ppl': math.exp(nll.sum() / count.sum()),
                                                 'ppl_ci': [iv.low, iv.high]})
        timings.add('ppl', time.perf_counter() - t0)
    return cache.read_json('ppl', key, 'ppl.json')


def _batches(rows: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for a in range(0, rows.shape[0], batch_size):
        yield rows[a:a + batch_size]


def _acts_stage(config, model: _Model, params, prune_key: str, tokens_key: str, tokens: dict,
                cache: StageCache, timings: _Timings, label: str) -> tuple[str, Any]:
    """resid_post of model.layer on the SAE training rows, BOS excluded, in an ActivationStore.

    The same store sae.store.capture_activations writes, filled batch by batch here so that the
    capture has a progress bar.
    """
    from prunesae_jax.sae.store import ActivationStore  # pylint: disable=g-import-not-at-top
    spec = {'layer': model.layer, 'dtype': config.sae.store_dtype}
    key = cache.key('acts', spec, [prune_key, tokens_key])
    if not cache.done('acts', key):
        t0 = time.perf_counter()
        rows = tokens['train']
        bsz = config.sae.capture_batch
        meta = {'layer': model.layer, 'model_id': model.spec, 'mask_id': prune_key,
                'exclude_bos': True, 'seq_len': int(rows.shape[1]), 'n_sequences': int(rows.shape[0])}
        with cache.writing('acts', key, spec) as tmp:
            writer = ActivationStore.create(str(tmp / 'store'), model.cfg.hidden_size,
                                            config.sae.store_dtype, meta)
            batches = _progress(config, _batches(rows, bsz), total=-(-rows.shape[0] // bsz),
                                desc=f'capture {label}', unit='batch', leave=False)
            for step, batch in enumerate(batches):
                h = _resid(model.cfg, params, batch, model.layer, bsz)  # [b, T, D]
                if not np.isfinite(h).all():
                    raise NonFiniteError('resid_post activations', stage='capture', layer=model.layer,
                                         step=step, detail=f'capture batch of {bsz} sequences')
                writer.append(h[:, 1:].reshape(-1, h.shape[-1]))  # BOS is never an SAE token
                crash_point('capture')
            writer.close()
        timings.add('capture', time.perf_counter() - t0)
    return key, ActivationStore(str(cache.path('acts', key) / 'store'))


# --------------------------------------------------------------------------- SAE training

def condition_seed(config, method: str, sparsity: float) -> int:
    """The first SAE seed of a condition.

    analysis.pairing='distinct': sae.seed for dense, a stable offset for pruned ones, so every
    condition's SAEs start from inits no other condition uses and survival (dense vs pruned) is
    measured across different inits exactly like the seed floor (dense vs dense).
    analysis.pairing='shared': sae.seed for every condition: seed s starts from the same init (and
    sees the same data order) in every condition; survival pairs (s, s), and the init-only null
    says how much of it the shared init alone explains.
    """
    if method == 'dense' or config.analysis.pairing == 'shared':
        return config.sae.seed
    h = int(stable_hash({'method': method, 'sparsity': round(float(sparsity), 9)}, 6), 16)
    return config.sae.seed + config.sae.n_seeds * (1 + h % 100_000)


def _sae_configs(config, model: _Model, n_tokens: int, seed: int | None = None):
    from prunesae_jax.sae.core import SAEConfig  # pylint: disable=g-import-not-at-top
    from prunesae_jax.sae.train import TrainConfig  # pylint: disable=g-import-not-at-top
    sae = config.sae
    d = model.cfg.hidden_size
    sae_cfg = SAEConfig(d_in=d, n_latents=sae.expansion * d, architecture=sae.architecture,
                        k=sae.k, aux_coeff=sae.aux_k_coef, dead_tokens=sae.dead_tokens or None)
    batch = min(sae.batch_size, n_tokens)
    n_steps = max(1, (n_tokens * sae.epochs) // batch)
    train_cfg = TrainConfig(n_seeds=sae.n_seeds, seed=sae.seed if seed is None else seed,
                            batch_size=batch, n_steps=n_steps,
                            lr=sae.lr or None, warmup_steps=max(1, min(100, n_steps // 10)),
                            checkpoint_every=sae.checkpoint_every,
                            snapshot_fracs=tuple(float(f) for f in sae.snapshots),
                            eval_tokens=min(16384, n_tokens), progress=config.progress)
    return sae_cfg, train_cfg


def _mesh(config):
    if jax.process_count() > 1:
        # Multi-process: every process trains every seed on one local device. The trainer hands
        # numpy batches to a jit with mesh shardings (refused under jax.distributed) and reads its
        # state back with np.asarray (needs arrays the process holds whole); see BUILD.md.
        return None
    n = jax.device_count()
    if n == 1:
        return None
    from prunesae_jax.sharding import make_mesh  # pylint: disable=g-import-not-at-top
    seed, data = config.mesh.seed, config.mesh.data
    seed = n // data if seed == -1 else seed
    data = n // seed if data == -1 else data
    if seed * data != n:
        raise ConfigError(f'config.mesh=(seed={config.mesh.seed}, data={config.mesh.data}) does not '
                          f'fit {n} devices; accepted: seed x data = {n}')
    return make_mesh(seed, data)


def _place_params(config, model: _Model, params):
    """params laid out on the ('data', 'model') mesh by config.mesh.model_sharding.

    Unchanged with 'none' or on one device. The model is loaded and pruned unsharded; the
    perplexity, capture and measure forwards then run on the placed params.
    """
    n = jax.device_count()
    if config.mesh.model_sharding == 'none' or n == 1:
        return params
    from prunesae_jax import sharding  # pylint: disable=g-import-not-at-top
    if n % config.mesh.model:
        raise ConfigError(f'config.mesh.model={config.mesh.model} does not divide the {n} devices; '
                          f'accepted: a divisor of {n}')
    mesh = sharding.make_model_mesh(n // config.mesh.model, config.mesh.model)
    return sharding.shard_params(params, mesh, config.mesh.model_sharding, model.cfg)


def _params_mesh(params):
    """The ('data', 'model') mesh params were placed on by _place_params, else None."""
    sh = getattr(params['final_norm'], 'sharding', None)
    mesh = getattr(sh, 'mesh', None)
    return mesh if mesh is not None and 'model' in mesh.axis_names else None


def _sae_stage(config, model: _Model, acts_key: str, store, cache: StageCache,
               timings: _Timings, label: str, seed: int) -> tuple[str, dict, dict]:
    """S seeds trained in one vmapped run: (key, params with seed axis in raw units, training record).

    The record holds final.json (per-seed FVU / L0 / dead fraction, distance from init, curves)
    plus 'snapshots' {step: W_dec [S, n, d]} and 'firing_rate' [S, n] over the training tokens.
    """
    from prunesae_jax.sae.train import train as train_saes  # pylint: disable=g-import-not-at-top
    sae_cfg, train_cfg = _sae_configs(config, model, store.n_tokens, seed)
    spec = {'sae': sae_cfg.to_dict(), 'train': dataclasses.asdict(train_cfg) | {'progress': None}}
    key = cache.key('sae', spec, [acts_key])
    # Checkpoints live outside the stage folder so that a killed run resumes its training.
    work = cache.root / 'sae' / f'{key}.train'
    if not cache.done('sae', key):
        t0 = time.perf_counter()
        _say(config, f'[sae] {label}: {train_cfg.n_seeds} seeds x {sae_cfg.n_latents} latents, '
             f'{train_cfg.n_steps} steps of {train_cfg.batch_size} tokens')
        res = train_saes(sae_cfg, train_cfg, _CrashPointStore(store),
                              workdir=str(work) if train_cfg.checkpoint_every else None,
                              mesh=_mesh(config))
        final = {k: np.asarray(v).tolist() for k, v in _final_metrics(res.final).items()}
        final.update(init_cos=np.asarray(res.final['init_cos']).tolist(), n_steps=train_cfg.n_steps,
                     batch_size=train_cfg.batch_size, train_tokens=int(store.n_tokens),
                     curve=_curve(res.metrics))
        with cache.writing('sae', key, spec) as tmp:
            atomic_write_npz(tmp / 'params.npz', {k: np.asarray(v) for k, v in res.params.items()})
            # The decoders at the snapshot steps (convergence) and how often each latent fired over
            # the training tokens (the fragility quintiles).
            atomic_write_npz(tmp / 'training.npz', {
                **{f'W_dec@{step}': np.asarray(w) for step, w in sorted(res.snapshots.items())},
                'firing_rate': np.asarray(res.final['train_firing_rate'], np.float64)})
            atomic_write_json(tmp / 'final.json', final)
        timings.add('sae', time.perf_counter() - t0)
    if work.exists():  # also when a run was killed between the commit and this cleanup
        import shutil  # pylint: disable=g-import-not-at-top
        shutil.rmtree(work, ignore_errors=True)
    final = cache.read_json('sae', key, 'final.json')
    training = cache.read_npz('sae', key, 'training.npz')
    final['snapshots'] = {int(k.split('@')[1]): v for k, v in training.items() if k.startswith('W_dec@')}
    final['firing_rate'] = training['firing_rate']
    return key, cache.read_npz('sae', key, 'params.npz'), final


def _curve(logged: list[dict]) -> dict[str, list[float]]:
    """Training curves from the trainer's log rows: each metric's mean over seeds per logged step."""
    names = ('fvu', 'l0', 'dead_frac', 'aux_loss')
    out = {'step': [int(r['step']) for r in logged]}
    for name in names:
        out[name] = [float(np.mean(r[name])) for r in logged if name in r]
    return out


class _CrashPointStore:
    """The activation store as the SAE trainer sees it, with crash_point('sae_step') before each
    training batch, so that tests can kill a run mid-training (see workdir.crash_point)."""

    def __init__(self, store):
        self._store = store

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def __len__(self) -> int:
        return len(self._store)

    def batch(self, *args, **kwargs) -> np.ndarray:
        crash_point('sae_step')
        return self._store.batch(*args, **kwargs)


def _final_metrics(final) -> dict[str, np.ndarray]:
    """fvu / l0 / dead_frac per seed from TrainResult.final (a dict of [S] or a list of dicts)."""
    if isinstance(final, dict):
        return {k: np.asarray(final[k]).reshape(-1) for k in ('fvu', 'l0', 'dead_frac') if k in final}
    return {k: np.asarray([f[k] for f in final]).reshape(-1) for k in ('fvu', 'l0', 'dead_frac')
            if all(k in f for f in final)}


# --------------------------------------------------------------------------- measures

def _resid(cfg, params, rows: np.ndarray, layer: int, batch: int) -> np.ndarray:
    """resid_post of `layer` [n, T, D] float32, in batches."""
    from prunesae_jax.models import decoder  # pylint: disable=g-import-not-at-top
    mesh = _params_mesh(params)
    if mesh is not None:  # params placed by config.mesh.model_sharding; batches split over 'data'
        from prunesae_jax import sharding  # pylint: disable=g-import-not-at-top
        out = [sharding.host_array(sharding.resid_post(cfg, params, b, layers=(layer,), mesh=mesh)[layer])
               .astype(np.float32) for b in _batches(rows, batch)]
        return np.concatenate(out)
    out = [np.asarray(decoder.resid_post(cfg, params, jnp.asarray(b), layers=(layer,))[layer],
                      np.float32) for b in _batches(rows, batch)]
    return np.concatenate(out)


def _single(params: dict, s: int = 0) -> dict:
    return {k: jnp.asarray(v[s]) for k, v in params.items()}


def _dictionary(config, model: _Model, dense_sae: dict, cache: StageCache):
    """(SAEConfig, params without seed axis, name) of the fixed dictionary for RQ3."""
    if config.transfer.source == 'dense':
        sae_cfg, _ = _sae_configs(config, model, config.sae.n_tokens)
        return sae_cfg, _single(dense_sae), 'dense SAE (seed 0)'
    return model.dictionary


def _pretrained_dictionary(config, model_cfg, spec: str):
    """(SAEConfig, params, name) of transfer.path (in transfer.repo, or local), d_in checked."""
    from prunesae_jax.sae.io import load_sae  # pylint: disable=g-import-not-at-top
    t = config.transfer
    path = os.path.expanduser(t.path)
    if t.repo:
        from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
        try:
            local = snapshot_download(t.repo, allow_patterns=[f'{t.path.rstrip("/")}*',
                                                              f'{t.path.rstrip("/")}/*'])
        except Exception as e:  # pylint: disable=broad-except  # offline, no such repo, ...
            first = (str(e).strip().splitlines() or [''])[0][:160]
            raise ConfigError(f'config.transfer.repo={t.repo!r} could not be fetched ({type(e).__name__}: '
                              f'{first}); accepted: a hub repo reachable from here (or in the HF '
                              "cache), or transfer.repo='' with a local transfer.path") from None
        path = os.path.join(local, t.path)
    try:
        sae_cfg, params = load_sae(path)
    except InputError:
        raise
    except Exception as e:  # pylint: disable=broad-except  # missing, garbled or foreign files there
        raise ConfigError(f'config.transfer.path={t.path!r} holds no readable dictionary '
                          f'({type(e).__name__}: {e}); accepted: a SAELens, Gemma Scope or sparsify '
                          'SAE') from None
    if sae_cfg.d_in != model_cfg.hidden_size:
        raise ConfigError(f'config.transfer.path={t.path!r} has d_in={sae_cfg.d_in}; accepted: a '
                          f'dictionary for d_model={model_cfg.hidden_size} ({spec})')
    return sae_cfg, {k: jnp.asarray(v) for k, v in params.items()}, f'{t.repo}/{t.path}'.strip('/')


@functools.partial(jax.jit, static_argnums=0)
def _encode(sae_cfg, params, x):
    from prunesae_jax.sae import core  # pylint: disable=g-import-not-at-top
    return core.encode(sae_cfg, params, x)


@functools.partial(jax.jit, static_argnums=0)
def _decode(sae_cfg, params, z):
    from prunesae_jax.sae import core  # pylint: disable=g-import-not-at-top
    return core.decode(sae_cfg, params, z)


def _encode_all(sae_cfg, params, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    return np.concatenate([np.asarray(_encode(sae_cfg, params, jnp.asarray(x[a:a + batch])))
                           for a in range(0, x.shape[0], batch)])


def _causal_spec(config, model: _Model) -> dict:
    ana = config.analysis
    return {'causal_features': ana.causal_features, 'causal_tokens': ana.causal_tokens,
            'seed': ana.seed, 'layer': model.layer}


def _causal_key(config, model: _Model, dense_sae_key: str, tokens_key: str) -> str:
    return StageCache.key('causal', _causal_spec(config, model), [dense_sae_key, tokens_key])


def _causal_stage(config, model: _Model, dense_sae_key: str, dense_sae: dict, tokens_key: str,
                  tokens: dict, cache: StageCache, timings: _Timings) -> dict:
    """RQ5 effects of the dense SAE's (seed 0) features on the dense model's loss."""
    from prunesae_jax.analysis import measures  # pylint: disable=g-import-not-at-top
    from prunesae_jax.sae import core  # pylint: disable=g-import-not-at-top
    ana = config.analysis
    spec = _causal_spec(config, model)
    key = _causal_key(config, model, dense_sae_key, tokens_key)
    if not cache.done('causal', key):
        t0 = time.perf_counter()
        sae_cfg, _ = _sae_configs(config, model, config.sae.n_tokens)
        p = _single(dense_sae)
        n_rows = _n_seqs(ana.causal_tokens, config.sae.seq_len)
        rows = jnp.asarray(tokens['heldout'][:n_rows])
        h = jnp.asarray(_resid(model.cfg, model.params, np.asarray(rows), model.layer,
                               config.sae.capture_batch), model.params['embed'].dtype)
        B, T, D = h.shape
        x = h[:, 1:].reshape(-1, D).astype(jnp.float32)
        codes = core.encode(sae_cfg, p, x)
        err = x - core.decode(sae_cfg, p, codes)  # keeps the clean loss equal to the model's
        chunk = min(128, T - 1)

        def loss_fn(c):
            x_new = (core.decode(sae_cfg, p, c) + err).astype(h.dtype).reshape(B, T - 1, D)
            return jnp.mean(tail_nll(model.cfg, model.layer, chunk, model.params,
                                      h.at[:, 1:].set(x_new), rows))

        eff = measures.causal_effects(loss_fn, codes, n_exact=ana.causal_features, seed=ana.seed)
        agreement = measures.causal_agreement(eff.estimate, eff.exact_idx, eff.exact,
                                              n_boot=max(ana.n_bootstrap, 1), ci=ana.ci, seed=ana.seed)
        with cache.writing('causal', key, spec) as tmp:
            atomic_write_json(tmp / 'causal.json', {
                'clean_loss': eff.clean_loss, 'estimate': eff.estimate.tolist(),
                'exact_idx': eff.exact_idx.tolist(), 'exact': eff.exact.tolist(),
                'fires': np.asarray(eff.fires).tolist(), 'n_tokens': int(codes.shape[0]),
                'pearson': eff.pearson, 'spearman': eff.spearman,
                'agreement': _iv(agreement)})
        timings.add('causal', time.perf_counter() - t0)
    return cache.read_json('causal', key, 'causal.json')


def _heldout_resid(config, model: _Model, params, tokens: dict) -> np.ndarray:
    """[N, D] resid_post of the held-out transfer tokens, BOS excluded."""
    rows = tokens['heldout'][:_n_seqs(config.analysis.transfer_tokens, config.sae.seq_len)]
    x = _resid(model.cfg, params, rows, model.layer, config.sae.capture_batch)[:, 1:]
    return x.reshape(-1, x.shape[-1])


class _DenseReference(dict):
    """The dense condition's reference data. The costly entries (firing rates, causal effects,
    the transfer dictionary) are computed on first use, so a re-run whose measures are all cached
    never computes them."""

    def __init__(self, timings: _Timings, makers: dict):
        super().__init__()
        self._timings = timings
        self._makers = makers

    def __missing__(self, name: str):
        if name not in self._makers:
            raise KeyError(name)
        t0 = time.perf_counter()
        value = self[name] = self._makers.pop(name)()
        if name != 'causal':  # the causal stage keeps its own timing
            self._timings.add('measures', time.perf_counter() - t0)
        return value


def _iv(interval) -> dict[str, float]:
    return {'estimate': float(interval.estimate), 'low': float(interval.low),
            'high': float(interval.high)}


def _transfer(config, model: _Model, params, dictionary, dense_codes_x, tokens: dict) -> dict:
    """RQ3: the fixed dictionary on this condition's held-out activations, with CIs over sequences.

    FVU, L0, Jaccard and CE loss recovered are ratios or means of per-sequence sums; their
    percentile intervals resample the held-out sequences (tokens of one sequence are not
    independent).
    """
    from prunesae_jax.analysis import measures, stats  # pylint: disable=g-import-not-at-top
    sae_cfg, p, name = dictionary
    ana = config.analysis
    n_rows = _n_seqs(ana.transfer_tokens, config.sae.seq_len)
    rows = tokens['heldout'][:n_rows]
    h_all = _resid(model.cfg, params, rows, model.layer, config.sae.capture_batch)  # [n, T, D]
    B, T, D = h_all.shape
    x = h_all[:, 1:].reshape(-1, D)
    codes = _encode_all(sae_cfg, p, x)
    x_hat = np.asarray(_decode(sae_cfg, p, jnp.asarray(codes)))
    dense_codes = _encode_all(sae_cfg, p, dense_codes_x)
    chunk = min(128, T - 1)
    dt = params['embed'].dtype
    losses = {'clean': [], 'spliced': [], 'zero': []}
    bsz = config.sae.capture_batch
    for a in range(0, B, bsz):
        h = jnp.asarray(h_all[a:a + bsz], dt)
        tk = jnp.asarray(rows[a:a + bsz])
        xh = jnp.asarray(x_hat.reshape(B, T - 1, D)[a:a + bsz], dt)
        for what, hh in (('clean', h), ('spliced', h.at[:, 1:].set(xh)), ('zero', h.at[:, 1:].set(0))):
            losses[what].append(np.asarray(tail_nll(model.cfg, model.layer, chunk, params, hh, tk),
                                           np.float64))
    # One row per held-out sequence: the sums each measure is a ratio or mean of.
    per_seq = np.stack([
        ((x - x_hat) ** 2).reshape(B, -1).sum(1),  # FVU numerator
        ((x - x.mean(0)) ** 2).reshape(B, -1).sum(1),  # FVU denominator (around the mean)
        (codes != 0).reshape(B, T - 1, -1).sum(-1).mean(-1),  # L0
        measures.jaccard_active(dense_codes, codes, per_token=True).reshape(B, -1).mean(1),
        *(np.concatenate(losses[w]) for w in ('clean', 'spliced', 'zero'))], 1)
    boot = dict(n_boot=max(ana.n_bootstrap, 1), ci=ana.ci, seed=ana.seed)

    def ci(stat):
        return [float(v) for v in stats.bootstrap_ci(per_seq, stat, **boot)[1:]]

    def ce_recovered(a):
        m = a.mean(0)
        return measures.ce_loss_recovered(m[4], m[5], m[6])

    clean, spliced, zero = (float(v) for v in per_seq[:, 4:].mean(0))
    return {
        'dictionary': name, 'n_tokens': int(x.shape[0]), 'n_sequences': int(B),
        'fvu': measures.fvu(x, x_hat), 'fvu_ci': ci(lambda a: a[:, 0].sum() / a[:, 1].sum()),
        'l0': measures.l0(codes), 'l0_ci': ci(lambda a: a[:, 2].mean()),
        'jaccard': measures.jaccard_active(dense_codes, codes), 'jaccard_ci': ci(lambda a: a[:, 3].mean()),
        'ce_clean': clean, 'ce_spliced': spliced, 'ce_zero': zero,
        'ce_recovered': measures.ce_loss_recovered(clean, spliced, zero),
        'ce_recovered_ci': ci(ce_recovered),
    }


def _convergence(config, final: dict, boot: dict) -> dict:
    """How far one condition's SAEs trained: seed agreement at each snapshot, distance from init,
    final FVU / L0 / dead fraction and the training curves (docs/method.md, "Convergence")."""
    from prunesae_jax.analysis import measures  # pylint: disable=g-import-not-at-top
    tau = float(config.analysis.tau)
    steps = sorted(final['snapshots'])
    shared = [measures.seed_stability(final['snapshots'][st], tau=tau, taus=(tau,), **boot).shared.estimate
              for st in steps]
    return {'n_steps': final['n_steps'], 'batch_size': final['batch_size'],
            'train_tokens': final['train_tokens'], 'steps': steps,
            'tokens': [st * final['batch_size'] for st in steps], 'shared': [float(v) for v in shared],
            'init_cos': final['init_cos'], 'fvu': final.get('fvu'), 'l0': final.get('l0'),
            'dead_frac': final.get('dead_frac'), 'curve': final['curve']}


def _survival(config, model: _Model, W_dense: np.ndarray, W: np.ndarray, boot: dict):
    """RQ2: MNN survival of the dense features in this condition's SAEs, by analysis.pairing.

    'distinct': every (dense seed i, pruned seed j) pair, CI resampling both seed sets;
    'shared': the pairs (s, s) of SAEs that started from one init, CI resampling s, and the
    init-only null: the matched fraction of dense seed s's SAE against its untrained init, i.e.
    what survival would read if the pruned SAE had never left the init it shares.
    Returns (JSON dict, per dense feature the share of its pairs it matched in [S_d, n], and its
    mean max cosine to the pruned SAEs [S_d, n]).
    """
    from prunesae_jax.analysis import matching, stats  # pylint: disable=g-import-not-at-top
    ana = config.analysis
    taus = [float(t) for t in ana.taus]
    S_d, S_p = W_dense.shape[0], W.shape[0]
    shared = ana.pairing == 'shared'
    pairs = [(s, s) for s in range(min(S_d, S_p))] if shared else [
        (i, j) for i in range(S_d) for j in range(S_p)]
    matches = [matching.mnn_match(W_dense[i], W[j], ana.tau) for i, j in pairs]
    fractions = np.array([r.matched_fraction for r in matches])
    n_pairs = np.zeros(S_d)
    per_feature = np.zeros(W_dense.shape[:2])
    max_cos = np.zeros(W_dense.shape[:2])
    for (i, _), r in zip(pairs, matches):
        n_pairs[i] += 1
        per_feature[i] += r.matched
        max_cos[i] += r.max_cos_a
    per_feature /= np.maximum(n_pairs, 1)[:, None]
    max_cos /= np.maximum(n_pairs, 1)[:, None]
    iv = (stats.matched_bootstrap_ci(fractions, **boot) if shared else
          stats.two_way_bootstrap_ci(fractions, np.array(pairs), S_d, S_p, **boot))
    out = {**iv._asdict(), 'pairing': ana.pairing, 'fractions': fractions.tolist(),
           'pairs': [list(p) for p in pairs],
           'by_tau': {str(t): float(np.mean([r.fraction_at(t) for r in matches])) for t in taus},
           'mean_max_cos': float(np.mean(max_cos))}
    if shared:
        from prunesae_jax.sae.train import initial_decoder  # pylint: disable=g-import-not-at-top
        sae_cfg, train_cfg = _sae_configs(config, model, config.sae.n_tokens)
        init = initial_decoder(sae_cfg, train_cfg.seed, S_d)
        null = np.array([matching.mnn_match(W_dense[s], init[s], ana.tau).matched_fraction
                         for s in range(S_d)])
        out['null'] = stats.matched_bootstrap_ci(null, **boot)._asdict()
    return out, per_feature, max_cos


def _fragility(config, per_feature: np.ndarray, dense_final: dict, boot: dict) -> dict:
    """RQ4 on the dense SAEs' firing rates over their training tokens.

    Only latents that fired at least analysis.min_firings times in training enter the quintiles
    (a rarer latent's rate is a handful of ties); when fewer than 10 per quintile qualify in some
    seed the analysis is not run and the reason is recorded.
    """
    from prunesae_jax.analysis import measures, stats  # pylint: disable=g-import-not-at-top
    ana = config.analysis
    rates = np.asarray(dense_final['firing_rate'], np.float64)  # [S, n]
    seen = dense_final['n_steps'] * dense_final['batch_size']
    ok = rates * seen >= ana.min_firings
    n_ok = ok.sum(1)
    need = 10 * ana.n_quintiles
    if n_ok.min() < need:
        return {'not_run': f'only {int(n_ok.min())} latents of a dense seed fired >= analysis.min_firings='
                           f'{ana.min_firings} times in training; the quintiles need >= {need}'}
    # Seeds keep their qualifying latents, truncated to a common count (a seed with more drops its
    # rarest qualifying latents) so that the per-seed arrays stack.
    keep = int(n_ok.min())
    order = [np.argsort(-np.where(ok[s], rates[s], -1.0), kind='stable')[:keep] for s in range(len(rates))]
    surv = np.stack([per_feature[s][o] for s, o in enumerate(order)])
    rate = np.stack([rates[s][o] for s, o in enumerate(order)])
    fr = measures.fragility(surv, rate, n_bins=ana.n_quintiles, **boot)
    q_ci = []
    for q in range(fr.per_seed.shape[1]):
        col = fr.per_seed[:, q]
        q_ci.append([float(v) for v in stats.bootstrap_ci(col, None, **boot)[1:]] if col.size >= 2 else None)
    return {'per_quintile': fr.per_quintile.tolist(), 'per_quintile_ci': q_ci, 'effect': _iv(fr.effect),
            'rho_quintile': float(fr.rho_quintile), 'rho_feature': _iv(fr.rho_feature),
            'rates_from': 'training', 'training_tokens': int(seen), 'min_firings': ana.min_firings,
            'n_latents': keep, 'n_latents_total': int(rates.shape[1])}


def _causal(config, causal: dict, max_cos: np.ndarray, boot: dict) -> dict:
    """RQ5: Spearman(survival, |effect|) over the dense features that fire on the causal tokens,
    the signed correlation beside it, and the attribution-vs-ablation agreement."""
    from prunesae_jax.analysis import measures  # pylint: disable=g-import-not-at-top
    ana = config.analysis
    fires = np.asarray(causal['fires'], np.int64)
    if ana.causal_measure == 'exact':
        idx = np.asarray(causal['exact_idx'], np.int64)
        effect = np.asarray(causal['exact'], np.float64)
    else:
        idx = np.arange(len(causal['estimate']))
        effect = np.asarray(causal['estimate'], np.float64)
    cos = max_cos[0][idx]
    corr = measures.survival_causal_correlation(cos, effect, live=fires[idx], **boot)
    live = np.flatnonzero(fires[idx] > 0)
    # At most 512 points in the scatter (a seeded subset of the live features); the correlation
    # uses all of them.
    keep = np.sort(np.random.default_rng(ana.seed).permutation(live.size)[:512])
    return {'n_features': int(idx.size), 'n_live': int(corr.n_live), 'measure': ana.causal_measure,
            'correlation': _iv(corr.interval), 'correlation_signed': _iv(corr.signed),
            'agreement': causal['agreement'], 'agreement_features': len(causal['exact_idx']),
            'max_cos': cos[live][keep].tolist(), 'effect': effect[live][keep].tolist()}


def _measures_stage(config, model: _Model, method: str, sparsity: float, params, keys: dict,
                    sae: dict, final: dict, dense: dict, tokens: dict, cache: StageCache,
                    timings: _Timings) -> dict:
    """RQ1-RQ5 and convergence of one condition against the dense condition, as plain JSON."""
    from prunesae_jax.analysis import matching, measures  # pylint: disable=g-import-not-at-top
    ana = config.analysis
    spec = {'analysis': ana.to_dict(), 'transfer': config.transfer.to_dict(),
            'method': method, 'sparsity': sparsity, 'version': MEASURES_VERSION}
    key = cache.key('measures', spec, [keys['sae'], keys['dense_sae'], keys['prune'],
                                       keys['tokens'], keys['causal']])
    if cache.done('measures', key):
        return cache.read_json('measures', key, 'measures.json')
    t0 = time.perf_counter()
    boot = dict(n_boot=max(ana.n_bootstrap, 1), ci=ana.ci, seed=ana.seed)
    W = np.asarray(sae['W_dec'])
    W_dense = np.asarray(dense['sae']['W_dec'])
    taus = [float(t) for t in ana.taus]
    st = measures.seed_stability(W, tau=ana.tau, taus=taus, **boot)
    stability = {'shared': st.shared_dict(), 'divergence': _iv(st.divergence),
                 'n_pairs': int(len(st.pair_indices)), 'kendalls_w': float(st.kendalls_w),
                 'by_tau': {str(t): float(np.mean(st.fractions[i])) for i, t in enumerate(taus)}}
    out: dict[str, Any] = {'stability': stability, 'fragility': None, 'causal': None,
                           'convergence': _convergence(config, final, boot)}
    if method == 'dense':
        # Dense vs dense over distinct seed pairs is the seed floor itself.
        # mean max cosine: a threshold-free companion of the matched fraction.
        cos = [float(np.mean(matching.max_cosine(W[i], W[j])[0])) for i, j in st.pair_indices]
        out['survival'] = {**stability['shared'], 'pairing': 'distinct',
                           'fractions': st.fractions[taus.index(ana.tau)].tolist() if ana.tau in taus else None,
                           'pairs': st.pair_indices.tolist(), 'by_tau': stability['by_tau'],
                           'mean_max_cos': float(np.mean(cos))}
    else:
        out['survival'], per_feature, max_cos = _survival(config, model, W_dense, W, boot)
        out['fragility'] = _fragility(config, per_feature, dense['final'], boot)
        out['causal'] = _causal(config, dense['causal'], max_cos, boot)
    out['transfer'] = _transfer(config, model, params, dense['dictionary'], dense['dict_x'], tokens)
    crash_point('measures')
    with cache.writing('measures', key, spec) as tmp:
        atomic_write_json(tmp / 'measures.json', out)
    timings.add('measures', time.perf_counter() - t0)
    return cache.read_json('measures', key, 'measures.json')


# --------------------------------------------------------------------------- the grid

def _stop_after() -> int | None:
    v = os.environ.get(STOP_ENV)
    if not v:
        return None
    if not v.isdigit():
        raise ConfigError(f'${STOP_ENV}={v!r}; accepted: a non-negative integer')
    return int(v)


def _run_model(config, model: _Model, cache: StageCache, timings: _Timings,
               where: dict) -> tuple[dict, list[dict]]:
    """The grid on one loaded model; `where` names the condition being run (for error messages)."""
    tokens_key, tokens = _tokens_stage(config, model, cache, timings)
    grid = conditions_of(config)
    stop = _stop_after()
    dense: dict[str, Any] = {}
    conds = []
    bar = _progress(config, grid, desc=f'{model.spec} conditions', unit='cond')
    for n_done, (method, sparsity) in enumerate(bar):
        label = 'dense' if method == 'dense' else f'{method} {sparsity:.0%}'
        where['condition'] = 'dense' if method == 'dense' else f'{method}@{sparsity:g}'
        set_activity(condition=where['condition'])  # for the launcher's line on an interrupt
        if stop is not None and n_done >= stop:
            raise StudyInterrupted(f'stopped after {n_done} conditions (${STOP_ENV}={stop}); '
                                   're-run to resume')
        prune_key, params, prune_report = _prune_stage(config, model, method, sparsity, tokens_key,
                                                       tokens, cache, timings)
        params = _place_params(config, model, params)
        ppl = _ppl_stage(config, model, params, prune_key, tokens_key, tokens, cache, timings)
        acts_key, store = _acts_stage(config, model, params, prune_key, tokens_key, tokens, cache,
                                      timings, label)
        sae_key, sae, final = _sae_stage(config, model, acts_key, store, cache, timings, label,
                                         condition_seed(config, method, sparsity))
        if method == 'dense':
            dense = _DenseReference(timings, {
                # Default arguments bind this iteration's values (the loop rebinds sae / params).
                'causal': lambda sae=sae, sae_key=sae_key: _causal_stage(
                    config, model, sae_key, sae, tokens_key, tokens, cache, timings),
                'dictionary': lambda sae=sae: _dictionary(config, model, sae, cache),
                'dict_x': lambda params=params: _heldout_resid(config, model, params, tokens),
            })
            dense.update(sae=sae, final=final, sae_key=sae_key, ppl=ppl['ppl'],
                         causal_key=_causal_key(config, model, sae_key, tokens_key))
        keys = {'sae': sae_key, 'dense_sae': dense['sae_key'], 'prune': prune_key,
                'tokens': tokens_key, 'causal': dense['causal_key']}
        m = _measures_stage(config, model, method, sparsity, params, keys, sae, final, dense, tokens,
                            cache, timings)
        cond = {
            'model': model.spec, 'layer': model.layer, 'method': method, 'sparsity': sparsity,
            'achieved_sparsity': float(prune_report.get('overall', 0.0)),
            'achieved_by_kind': prune_report.get('per_kind'),
            'group': None if method == 'dense' else (config.pruning.group[method] or None),
            'ppl': ppl['ppl'], 'ppl_ci': ppl.get('ppl_ci'), 'ppl_tokens': ppl['n_tokens'],
            'delta_log_ppl': math.log(ppl['ppl']) - math.log(dense['ppl']),
            **m, 'sae': {k: final[k] for k in ('fvu', 'l0', 'dead_frac') if k in final},
        }
        conds.append(cond)
        _say(config, report_lib.format_condition(cond))
        # Drop this condition's pruned weights before the next prune: never two pruned copies.
        del params, store, sae
    info = {'family': model.cfg.family, 'num_layers': model.cfg.num_layers,
            'd_model': model.cfg.hidden_size, 'layer': model.layer,
            'n_latents': config.sae.expansion * model.cfg.hidden_size, 'dense_ppl': dense['ppl']}
    return info, conds


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Runs (or resumes) the study; writes results.json, timings.json, tables, figures, report.md.

    Returns the results dict (schema in prunesae_jax/study/report.py). Raises ConfigError (an
    InputError) before any work for a bad config, InputError for a bad checkpoint or corpus (the
    model is loaded and checked before the workdir is touched), NonFiniteError naming the stage,
    condition, layer and step when NaN / inf appears, workdir.WorkdirBusy (an InputError) when
    another live run holds the workdir, and StudyInterrupted when
    $PRUNESAE_STOP_AFTER_CONDITIONS stops it early.
    """
    validate(config)
    t0 = time.perf_counter()
    timings = _Timings()
    set_activity('load model', condition=None)
    model = _load_model(config)  # a bad checkpoint, layer or N:M width fails before anything is written
    timings.add('load_model', time.perf_counter() - t0)
    workdir = Path(workdir)
    if jax.process_index() > 0:
        # Multi-host: every process runs the same stages in lockstep (their collectives must
        # match), so each keeps its own cache; only process 0 writes into `workdir`.
        workdir = workdir.with_name(f'{workdir.name}.process{jax.process_index()}')
    # Creates the workdir; one live run per workdir; removes what killed runs left.
    with hold_workdir(workdir):
        return _run_held(config, model, workdir, timings, t0)


def _run_held(config, model: _Model, workdir: Path, timings: _Timings, t0: float) -> dict[str, Any]:
    """run() once the model is loaded and the workdir is held."""
    write_config(workdir, config)  # a changed config first removes the old config's results
    cache = StageCache(workdir)
    where = {'layer': model.layer}
    try:
        info, conds = _run_model(config, model, cache, timings, where)
    except NonFiniteError as e:  # name the condition and layer; finished stages stay cached
        raise e.with_context(**where) from None
    set_activity('results and report', condition=None)
    prov = provenance(config)
    prov.pop('config')
    results = {
        'schema': report_lib.SCHEMA, 'name': config.name, 'config': to_jsonable(config),
        'provenance': prov, 'models': {config.model: info}, 'conditions': conds,
    }
    pruned = [c for c in conds if c['method'] != 'dense']
    taus = [str(float(t)) for t in config.analysis.taus]
    if len(pruned) >= 2 and len(taus) >= 2:
        from prunesae_jax.analysis import measures  # pylint: disable=g-import-not-at-top
        scores = np.array([[c['survival']['by_tau'][t] for c in pruned] for t in taus])
        results['tau_agreement'] = {'taus': [float(t) for t in taus],
                                    'kendalls_w': float(measures.tau_agreement(scores))}
    results['claims'] = report_lib.summarize_claims(results)
    results = to_jsonable(results)
    atomic_write_json(workdir / 'results.json', results)
    crash_point('after_results')
    t_report = time.perf_counter()
    # The report is a function of results.json alone (byte-identical across runs and resumes);
    # wall-clock times live in timings.json only.
    report_lib.write_report(results, workdir)
    timings.add('report', time.perf_counter() - t_report)
    timings['total_s'] = round(time.perf_counter() - t0, 3)
    atomic_write_json(workdir / 'timings.json', timings)
    return results
