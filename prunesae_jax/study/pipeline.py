"""run(config, workdir): the study's grid, stage by stage, cached and resumable.

For the model: load -> tokens -> for each condition (dense first, then method x sparsity):
prune -> perplexity -> capture resid_post activations to a store -> train S seeds of SAEs in
one vmapped run -> the registered measures (prunesae_jax/analysis/measures/) against the dense
condition. Each stage is cached under workdir/stages/<stage>/<key>/ (see workdir.py); the key
hashes the config fields that decide the stage and the keys of the stages it reads, so editing
e.g. `analysis.tau` recomputes only the measures. Every number in results.json is read back from
the cache, so a resumed run writes the same bytes as an uninterrupted one.

This module only orders, caches and reports the stages; each computes in the package that owns it
(models, pruning, sae, analysis). The protocol choices are in docs/method.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from prunesae_jax import pruning, sharding
from prunesae_jax.analysis import measures, splice
from prunesae_jax.analysis.measures import causal, convergence, stability, transfer
from prunesae_jax.errors import NonFiniteError
from prunesae_jax.io import atomic_write_json, atomic_write_npz, to_jsonable
from prunesae_jax.models.load import LoadedModel
from prunesae_jax.study import inputs
from prunesae_jax.study import report as report_lib
from prunesae_jax.study.config import (
    analysis_settings,
    condition_seed,
    conditions_of,
    n_sequences,
    prune_args,
    sae_config,
    train_config,
    validate,
)
from prunesae_jax.study.workdir import StageCache, hold_workdir, provenance, set_activity, write_config

__all__ = ['run']

# Bumped whenever the measures stage's output changes, so older cached measures are recomputed.
MEASURES_VERSION = 3


class _Timings(dict):
    """Wall-clock seconds per stage of this invocation, for timings.json (not results.json)."""

    def add(self, name: str, seconds: float) -> None:
        self[name] = round(self.get(name, 0.0) + seconds, 3)


@dataclasses.dataclass
class _Study:
    """What every stage reads: the config, the loaded model, its layer, the cache and timings."""

    config: Any
    model: LoadedModel
    layer: int
    dictionary: Any  # transfer.source='pretrained': (SAEConfig, params, name), loaded up front
    cache: StageCache
    timings: _Timings

    def rows(self, tokens: dict, n_tokens: int) -> np.ndarray:
        """The held-out rows that hold n_tokens SAE tokens (BOS excluded)."""
        return tokens['heldout'][: n_sequences(n_tokens, self.config.sae.seq_len)]


def _with_progress_bar(config, iterable, **kw):
    """iterable with a tqdm bar when config.progress (iterable=None: a bar to update by hand), else
    iterable itself."""
    if not config.progress:
        return iterable
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kw)


def _progress_line(config, line: str) -> None:
    """One line of progress: above the progress bars when they are on, else to the log."""
    if config.progress:
        from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

        tqdm.write(line, file=sys.stderr)
    else:
        logging.info('%s', line)


# --------------------------------------------------------------------------- the stages


def _cached(st: _Study, stage: str, spec: dict, upstream: list[str], make_files) -> str:
    """The key of `stage`. When it is not cached, make_files() -> {file name: contents} runs and its
    files are written into the stage's folder (a dict to .json, arrays to .npz, a function of the
    path writes its own file), then committed."""
    key = st.cache.key(stage, spec, upstream)
    if not st.cache.done(stage, key):
        t0 = time.perf_counter()
        files = make_files()
        with st.cache.writing(stage, key, spec) as tmp:
            for name, value in files.items():
                if callable(value):
                    value(tmp / name)
                elif name.endswith('.npz'):
                    atomic_write_npz(tmp / name, value)
                else:
                    atomic_write_json(tmp / name, value)
        st.timings.add(stage, time.perf_counter() - t0)
    return key


def _tokens_stage(st: _Study) -> tuple[str, dict]:
    """Calibration rows, the perplexity stream, SAE training rows and held-out rows, as int32."""
    spec = inputs.tokens_spec(st.config)
    key = _cached(
        st,
        'tokens',
        spec,
        [st.model.key],
        lambda: {
            'tokens.npz': inputs.read_tokens(
                st.config, st.model.tokenizer, st.model.cfg.bos_token_id, spec['n_train'], spec['n_held']
            )
        },
    )
    return key, st.cache.read_npz('tokens', key, 'tokens.npz')


def _prune_stage(st: _Study, method: str, sparsity: float, tokens_key: str, tokens: dict) -> tuple[str, Any, dict]:
    """(key, pruned params, sparsity report) of one condition; the dense condition is the model."""
    model = st.model
    if method == 'dense':
        return model.key, model.params, {'overall': 0.0, 'per_kind': {'attention': 0.0, 'mlp': 0.0}}
    group, nm = pruning.parse_group(st.config.pruning.group[method] if method in st.config.pruning.group else '')
    spec = {
        'method': method,
        'sparsity': sparsity,
        'group': group,
        'nm': nm,
        'block_sequential': st.config.pruning.block_sequential,
    }
    calibrated = method != 'magnitude'

    def prune() -> dict:
        res = pruning.prune_with(
            model.cfg,
            model.params,
            prune_args(st.config, method, sparsity),
            calib_tokens=tokens['calibration'] if calibrated else None,
            progress=st.config.progress,
        )
        files = {'masks.npz': functools.partial(pruning.save_masks, masks=res.masks)}
        if method == 'sparsegpt':  # SparseGPT also updates the kept weights
            files['weights.npz'] = pruning.masks.prunable_weights(res.params)
        return {**files, 'report.json': {k: v for k, v in res.report.items() if k != 'seconds'}}

    key = _cached(st, 'prune', spec, [model.key] + ([tokens_key] if calibrated else []), prune)
    masks = pruning.load_masks(st.cache.path('prune', key) / 'masks.npz', model.params)
    params = model.params
    if method == 'sparsegpt':
        params = pruning.masks.with_prunable_weights(params, st.cache.read_npz('prune', key, 'weights.npz'))
    return key, pruning.masks.masked_params(params, masks), st.cache.read_json('prune', key, 'report.json')


def _ppl_stage(st: _Study, params, prune_key: str, tokens_key: str, tokens: dict) -> dict:
    """Perplexity of the condition on the eval stream, with a CI that resamples the windows."""
    from prunesae_jax.analysis.perplexity import perplexity_record  # pylint: disable=g-import-not-at-top
    from prunesae_jax.pruning.perplexity import window_nll  # pylint: disable=g-import-not-at-top

    config, ana = st.config, st.config.analysis
    spec = {'ppl': config.ppl.to_dict(), 'ci': [ana.n_bootstrap, ana.ci, ana.seed]}

    def perplexity() -> dict:
        nll, count = window_nll(
            st.model.cfg,
            params,
            tokens['eval_stream'],
            window=config.ppl.window,
            stride=config.ppl.stride,
            batch_size=config.ppl.batch_size,
            bos_token_id=st.model.cfg.bos_token_id,
        )
        return {'ppl.json': perplexity_record(nll, count, **analysis_settings(st.config).boot)}

    key = _cached(st, 'ppl', spec, [prune_key, tokens_key], perplexity)
    return st.cache.read_json('ppl', key, 'ppl.json')


def _acts_stage(st: _Study, params, prune_key: str, tokens_key: str, tokens: dict, label: str) -> tuple[str, Any]:
    """resid_post of the layer on the SAE training rows, BOS excluded, in an ActivationStore."""
    from prunesae_jax.sae.store import ActivationStore, capture_activations  # pylint: disable=g-import-not-at-top

    rows, bsz = tokens['train'], st.config.sae.capture_batch

    def capture(path) -> None:
        bar = _with_progress_bar(
            st.config, None, total=-(-rows.shape[0] // bsz), desc=f'capture {label}', unit='batch', leave=False
        )
        capture_activations(
            st.model.cfg,
            params,
            rows,
            st.layer,
            str(path),
            model_id=st.model.spec,
            mask_id=prune_key,
            dtype=st.config.sae.store_dtype,
            batch_size=bsz,
            on_batch=lambda step, n: bar.update(1) if bar is not None else None,
        )
        if bar is not None:
            bar.close()

    spec = {'layer': st.layer, 'dtype': st.config.sae.store_dtype}
    key = _cached(st, 'acts', spec, [prune_key, tokens_key], lambda: {'store': capture})
    return key, ActivationStore(str(st.cache.path('acts', key) / 'store'))


def _sae_stage(st: _Study, acts_key: str, store, label: str, seed: int) -> tuple[str, dict, dict]:
    """S seeds trained in one vmapped run: (key, params with seed axis in raw units, training record).

    The record holds final.json (convergence.training_record) plus 'snapshots' {step: W_dec [S, n, d]}
    and 'firing_rate' [S, n] over the training tokens.
    """
    from prunesae_jax.sae.train import train as train_saes  # pylint: disable=g-import-not-at-top

    sae_cfg = sae_config(st.config, st.model.cfg.hidden_size)
    train_cfg = train_config(st.config, store.n_tokens, seed)
    spec = {'sae': sae_cfg.to_dict(), 'train': dataclasses.asdict(train_cfg) | {'progress': None}}
    # Checkpoints live outside the stage folder so that a killed run resumes its training.
    work = st.cache.root / 'sae' / f'{st.cache.key("sae", spec, [acts_key])}.train'

    def train() -> dict:
        _progress_line(
            st.config,
            f'[sae] {label}: {train_cfg.n_seeds} seeds x {sae_cfg.n_latents} latents, '
            f'{train_cfg.n_steps} steps of {train_cfg.batch_size} tokens',
        )
        res = train_saes(
            sae_cfg,
            train_cfg,
            store,
            workdir=str(work) if train_cfg.checkpoint_every else None,
            mesh=sharding.sae_mesh(st.config.mesh.seed, st.config.mesh.data),
        )
        return {
            'params.npz': {k: np.asarray(v) for k, v in res.params.items()},
            # The decoders at the snapshot steps (convergence) and how often each latent fired
            # over the training tokens (the fragility quintiles).
            'training.npz': {
                **{f'W_dec@{step}': np.asarray(w) for step, w in sorted(res.snapshots.items())},
                'firing_rate': np.asarray(res.final['train_firing_rate'], np.float64),
            },
            'final.json': convergence.training_record(res, train_cfg.n_steps, train_cfg.batch_size, store.n_tokens),
        }

    key = _cached(st, 'sae', spec, [acts_key], train)
    if work.exists():  # also when a run was killed between the commit and this cleanup
        shutil.rmtree(work, ignore_errors=True)
    record = st.cache.read_json('sae', key, 'final.json')
    training = st.cache.read_npz('sae', key, 'training.npz')
    record['snapshots'] = {int(k.split('@')[1]): v for k, v in training.items() if k.startswith('W_dec@')}
    record['firing_rate'] = training['firing_rate']
    return key, st.cache.read_npz('sae', key, 'params.npz'), record


def _causal_stage(st: _Study, dense_sae_key: str, dense_sae: dict, tokens_key: str, tokens: dict) -> tuple[str, Any]:
    """(key, a function that computes, caches and returns the causal effects of dense SAE seed 0's
    features on the dense model's loss); the pipeline calls it only when a measure needs them."""
    ana = st.config.analysis
    spec = {
        'causal_features': ana.causal_features,
        'causal_tokens': ana.causal_tokens,
        'seed': ana.seed,
        'layer': st.layer,
    }
    upstream = [dense_sae_key, tokens_key]

    def effects() -> dict:
        key = _cached(
            st,
            'causal',
            spec,
            upstream,
            lambda: {
                'causal.json': causal.dense_effects(
                    st.model.cfg,
                    st.model.params,
                    st.layer,
                    st.rows(tokens, ana.causal_tokens),
                    sae_config(st.config, st.model.cfg.hidden_size),
                    splice.one_seed(dense_sae),
                    ana.causal_features,
                    analysis_settings(st.config),
                )
            },
        )
        return st.cache.read_json('causal', key, 'causal.json')

    return StageCache.key('causal', spec, upstream), effects


class _LazyDense(dict):
    """The dense condition's reference data. The costly entries (causal effects, the transfer
    dictionary and its held-out activations, the untrained decoders) are made on first use, so a
    re-run whose measures are all cached never computes them."""

    def __init__(self, makers: dict, **values):
        super().__init__(**values)
        self._makers = makers

    def __missing__(self, name: str):
        if name not in self._makers:
            raise KeyError(name)
        value = self[name] = self._makers.pop(name)()
        return value


def _dense_reference(
    st: _Study, params, sae: dict, sae_key: str, record: dict, ppl: float, tokens_key: str, tokens: dict
) -> _LazyDense:
    causal_key, effects = _causal_stage(st, sae_key, sae, tokens_key, tokens)
    ana, d_model = st.config.analysis, st.model.cfg.hidden_size
    return _LazyDense(
        {
            'causal': effects,
            'dictionary': lambda: (
                st.dictionary or (sae_config(st.config, d_model), splice.one_seed(sae), 'dense SAE (seed 0)')
            ),
            'heldout_x': lambda: transfer.heldout_activations(
                st.model.cfg, params, st.rows(tokens, ana.transfer_tokens), st.layer, st.config.sae.capture_batch
            ),
            'W_init': lambda: _initial_decoders(st, len(sae['W_dec'])),
        },
        sae=sae,
        record=record,
        sae_key=sae_key,
        ppl=ppl,
        causal_key=causal_key,
    )


def _initial_decoders(st: _Study, n_seeds: int) -> np.ndarray:
    from prunesae_jax.sae.train import initial_decoder  # pylint: disable=g-import-not-at-top

    return initial_decoder(sae_config(st.config, st.model.cfg.hidden_size), st.config.sae.seed, n_seeds)


def _measures_stage(
    st: _Study,
    method: str,
    sparsity: float,
    params,
    keys: dict,
    sae: dict,
    record: dict,
    dense: _LazyDense,
    tokens: dict,
) -> dict:
    """Every registered measure (measures.ORDER) of one condition against the dense one, as JSON."""
    config = st.config
    spec = {
        'analysis': config.analysis.to_dict(),
        'transfer': config.transfer.to_dict(),
        'method': method,
        'sparsity': sparsity,
        'version': MEASURES_VERSION,
    }

    def measure_all() -> dict:
        pruned = method != 'dense'
        cond = measures.Condition(
            method,
            sparsity,
            np.asarray(sae['W_dec']),
            record,
            analysis_settings(st.config),
            st.model.cfg,
            st.layer,
            params,
            st.rows(tokens, config.analysis.transfer_tokens),
        )
        ref = measures.Dense(
            np.asarray(dense['sae']['W_dec']),
            dense['record'],
            causal=dense['causal'] if pruned else None,
            dictionary=dense['dictionary'],
            heldout_x=dense['heldout_x'],
            W_init=dense['W_init'] if pruned and config.analysis.pairing == 'shared' else None,
        )
        return {'measures.json': {name: measures.get(name)(ref, cond) for name in measures.ORDER}}

    key = _cached(
        st,
        'measures',
        spec,
        [keys['sae'], keys['dense_sae'], keys['prune'], keys['tokens'], keys['causal']],
        measure_all,
    )
    return st.cache.read_json('measures', key, 'measures.json')


# --------------------------------------------------------------------------- the grid


def _run_condition(
    st: _Study, method: str, sparsity: float, tokens_key: str, tokens: dict, dense: _LazyDense | None
) -> tuple[dict, _LazyDense]:
    """One condition through every stage: (its results.json entry, the dense reference)."""
    config = st.config
    label = 'dense' if method == 'dense' else f'{method} {sparsity:.0%}'
    prune_key, params, prune_report = _prune_stage(st, method, sparsity, tokens_key, tokens)
    params = sharding.place_params(params, config.mesh.model_sharding, config.mesh.model, st.model.cfg)
    ppl = _ppl_stage(st, params, prune_key, tokens_key, tokens)
    acts_key, store = _acts_stage(st, params, prune_key, tokens_key, tokens, label)
    sae_key, sae, record = _sae_stage(st, acts_key, store, label, condition_seed(config, method, sparsity))
    if method == 'dense':
        dense = _dense_reference(st, params, sae, sae_key, record, ppl['ppl'], tokens_key, tokens)
    keys = {
        'sae': sae_key,
        'dense_sae': dense['sae_key'],
        'prune': prune_key,
        'tokens': tokens_key,
        'causal': dense['causal_key'],
    }
    m = _measures_stage(st, method, sparsity, params, keys, sae, record, dense, tokens)
    return {
        'model': st.model.spec,
        'layer': st.layer,
        'method': method,
        'sparsity': sparsity,
        'achieved_sparsity': float(prune_report.get('overall', 0.0)),
        'achieved_by_kind': prune_report.get('per_kind'),
        'group': None if method == 'dense' else (config.pruning.group[method] or None),
        'ppl': ppl['ppl'],
        'ppl_ci': ppl.get('ppl_ci'),
        'ppl_tokens': ppl['n_tokens'],
        'delta_log_ppl': math.log(ppl['ppl']) - math.log(dense['ppl']),
        **m,
        'sae': {k: record[k] for k in ('fvu', 'l0', 'dead_frac') if k in record},
    }, dense


def _run_model(st: _Study, where: dict) -> tuple[dict, list[dict]]:
    """The grid on one loaded model; `where` names the condition being run (for error messages).

    Each condition's pruned params are dropped before the next prune: never two pruned copies.
    """
    tokens_key, tokens = _tokens_stage(st)
    dense, conds = None, []
    for method, sparsity in _with_progress_bar(
        st.config, conditions_of(st.config), desc=f'{st.model.spec} conditions', unit='cond'
    ):
        where['condition'] = 'dense' if method == 'dense' else f'{method}@{sparsity:g}'
        set_activity(condition=where['condition'])  # for the launcher's line on an interrupt
        cond, dense = _run_condition(st, method, sparsity, tokens_key, tokens, dense)
        conds.append(cond)
        _progress_line(st.config, report_lib.format_condition(cond))
    cfg = st.model.cfg
    info = {
        'family': cfg.family,
        'num_layers': cfg.num_layers,
        'd_model': cfg.hidden_size,
        'layer': st.layer,
        'n_latents': st.config.sae.expansion * cfg.hidden_size,
        'dense_ppl': dense['ppl'],
    }
    return info, conds


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Runs (or resumes) the study; writes results.json, timings.json, tables, figures, report.md.

    Returns the results dict (schema in prunesae_jax/study/report.py). Raises ConfigError (an
    InputError) before any work for a bad config, InputError for a bad checkpoint or corpus (the
    model is loaded and checked before the workdir is touched), NonFiniteError naming the stage,
    condition, layer and step when NaN / inf appears, and workdir.WorkdirBusy (an InputError) when
    another live run holds the workdir.
    """
    validate(config)
    t0 = time.perf_counter()
    timings = _Timings()
    set_activity('load model', condition=None)
    model, layer, dictionary = inputs.load(config)  # a bad checkpoint, layer or N:M width fails before any write
    timings.add('load_model', time.perf_counter() - t0)
    workdir = Path(workdir)
    if jax.process_index() > 0:
        # Multi-host: every process runs the same stages in lockstep (their collectives must
        # match), so each keeps its own cache; only process 0 writes into `workdir`.
        workdir = workdir.with_name(f'{workdir.name}.process{jax.process_index()}')
    # Creates the workdir; one live run per workdir; removes what killed runs left.
    with hold_workdir(workdir):
        write_config(workdir, config)  # a changed config first removes the old config's results
        st = _Study(config, model, layer, dictionary, StageCache(workdir), timings)
        return _run_held(st, workdir, t0)


def _run_held(st: _Study, workdir: Path, t0: float) -> dict[str, Any]:
    """run() once the model is loaded and the workdir is held."""
    config = st.config
    where = {'layer': st.layer}
    try:
        info, conds = _run_model(st, where)
    except NonFiniteError as e:  # name the condition and layer; finished stages stay cached
        raise e.with_context(**where) from None
    set_activity('results and report', condition=None)
    prov = provenance(config)
    prov.pop('config')
    results = {
        'schema': report_lib.SCHEMA,
        'name': config.name,
        'config': to_jsonable(config),
        'provenance': prov,
        'models': {config.model: info},
        'conditions': conds,
    }
    agreement = stability.survival_tau_agreement([c for c in conds if c['method'] != 'dense'], config.analysis.taus)
    if agreement is not None:
        results['tau_agreement'] = agreement
    results['claims'] = report_lib.summarize_claims(results)
    results = to_jsonable(results)
    atomic_write_json(workdir / 'results.json', results)
    t_report = time.perf_counter()
    # The report is a function of results.json alone (byte-identical across runs and resumes);
    # wall-clock times live in timings.json only.
    report_lib.write_report(results, workdir)
    st.timings.add('report', time.perf_counter() - t_report)
    st.timings['total_s'] = round(time.perf_counter() - t0, 3)
    atomic_write_json(workdir / 'timings.json', st.timings)
    return results
