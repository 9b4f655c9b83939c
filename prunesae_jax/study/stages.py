"""The study's stages, each cached under workdir/stages/<stage>/<key>/ (see workdir.py).

A stage's key hashes the config fields that decide it and the keys of the stages it reads, so
editing e.g. `analysis.tau` recomputes only the measures. Each stage computes by calling the
package that owns the work (models, pruning, sae, analysis) and writes its files through `cached`;
every number the pipeline uses is read back from the cache, so a resumed run writes the same
results.json bytes as an uninterrupted one. pipeline.py orders the stages over the grid.

Under jax.distributed (P processes, one shared workdir) every process walks the same stages with
the same keys. The stages that split work over the processes (pruning calibration, capture, SAE
training: `cached(..., shared=True)`) run on every process; the others (tokens, perplexity, the
causal effects and the measures) are computed once, on process 0, while the others wait. Process
0 alone decides whether a stage is cached, writes and commits it; every process then reads it back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from prunesae_jax import pruning, sharding
from prunesae_jax.analysis import measures, splice
from prunesae_jax.analysis.measures import causal, convergence, transfer
from prunesae_jax.io import atomic_write_json, atomic_write_npz
from prunesae_jax.models.load import LoadedModel
from prunesae_jax.study import inputs
from prunesae_jax.study.config import (
    analysis_settings,
    n_sequences,
    prune_args,
    sae_config,
    train_config,
)
from prunesae_jax.study.workdir import StageCache

__all__ = [
    'Study',
    'Timings',
    'cached',
    'tokens_stage',
    'prune_stage',
    'ppl_stage',
    'acts_stage',
    'sae_stage',
    'causal_stage',
    'dense_reference',
    'measures_stage',
    'progress_bar',
    'progress_line',
]


# Bumped whenever the measures stage's output changes, so older cached measures are recomputed.
MEASURES_VERSION = 3


class EachProcess:
    """A stage file every process writes its own part of (`write(path)`; the activation store's
    shards), where a plain function of the path is run by process 0 alone."""

    def __init__(self, write):
        self.write = write


class Timings(dict):
    """Wall-clock seconds per stage of this invocation, for timings.json (not results.json)."""

    def add(self, name: str, seconds: float) -> None:
        self[name] = round(self.get(name, 0.0) + seconds, 3)


@dataclasses.dataclass
class Study:
    """What every stage reads: the config, the loaded model, its layer, the cache and timings."""

    config: Any
    model: LoadedModel
    layer: int
    dictionary: Any  # transfer.source='pretrained': (SAEConfig, params, name), loaded up front
    cache: StageCache
    timings: Timings
    alone: bool = False  # process 0 computing a stage for every process: nested stages do not wait

    @contextlib.contextmanager
    def on_main_alone(self):
        alone, self.alone = self.alone, True
        try:
            yield
        finally:
            self.alone = alone

    def rows(self, tokens: dict, n_tokens: int) -> np.ndarray:
        """The held-out rows that hold n_tokens SAE tokens (BOS excluded)."""
        return tokens['heldout'][: n_sequences(n_tokens, self.config.sae.seq_len)]


def progress_bar(config, iterable, **kw):
    """iterable with a tqdm bar when config.progress (iterable=None: a bar to update by hand), else
    iterable itself. Only process 0 shows bars."""
    if not config.progress or not sharding.is_main():
        return iterable
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kw)


def progress_line(config, line: str) -> None:
    """One line of progress: above the progress bars when they are on, else to the log."""
    if config.progress and sharding.is_main():
        from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

        tqdm.write(line, file=sys.stderr)
    else:
        logging.info('%s', line)


# --------------------------------------------------------------------------- the stages


def cached(st: Study, stage: str, spec: dict, upstream: list[str], make_files, shared: bool = False) -> str:
    """The key of `stage`. When it is not cached, make_files() -> {file name: contents} runs and its
    files are written into the stage's folder (a dict to .json, arrays to .npz, a function of the
    path writes its own file, an EachProcess its part), then committed.

    Several processes: process 0 checks the cache for all. make_files runs on every process when
    `shared` (each does its share of the work), else on process 0 alone; every process writes
    its part of an EachProcess file, process 0 all other files.
    """
    key = st.cache.key(stage, spec, upstream)
    together = jax.process_count() > 1 and not st.alone
    is_done = lambda: st.cache.done(stage, key)
    if sharding.from_main(is_done) if together else is_done():  # process 0 answers for all
        return key
    t0 = time.perf_counter()
    main = not together or sharding.is_main()
    files = {}
    if shared or not together:
        files = make_files()
    elif main:
        with st.on_main_alone():
            files = make_files()
    with st.cache.writing(stage, key, spec, together=together) as tmp:
        for name, value in files.items():
            if isinstance(value, EachProcess):
                value.write(tmp / name)
            elif not main:
                continue
            elif callable(value):
                value(tmp / name)
            elif name.endswith('.npz'):
                atomic_write_npz(tmp / name, value)
            else:
                atomic_write_json(tmp / name, value)
    st.timings.add(stage, time.perf_counter() - t0)
    return key


def tokens_stage(st: Study) -> tuple[str, dict]:
    """Calibration rows, the perplexity stream, SAE training rows and held-out rows, as int32."""
    spec = inputs.tokens_spec(st.config)
    key = cached(
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


def prune_stage(st: Study, method: str, sparsity: float, tokens_key: str, tokens: dict) -> tuple[str, Any, dict]:
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
            progress=st.config.progress and sharding.is_main(),
        )
        files = {'masks.npz': functools.partial(pruning.save_masks, masks=res.masks)}
        if method == 'sparsegpt':  # SparseGPT also updates the kept weights
            files['weights.npz'] = pruning.masks.prunable_weights(res.params)
        return {**files, 'report.json': {k: v for k, v in res.report.items() if k != 'seconds'}}

    key = cached(st, 'prune', spec, [model.key] + ([tokens_key] if calibrated else []), prune, shared=calibrated)
    masks = pruning.load_masks(st.cache.path('prune', key) / 'masks.npz', model.params)
    params = model.params
    if method == 'sparsegpt':
        params = pruning.masks.with_prunable_weights(params, st.cache.read_npz('prune', key, 'weights.npz'))
    return key, pruning.masks.masked_params(params, masks), st.cache.read_json('prune', key, 'report.json')


def ppl_stage(st: Study, params, prune_key: str, tokens_key: str, tokens: dict) -> dict:
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

    key = cached(st, 'ppl', spec, [prune_key, tokens_key], perplexity)
    return st.cache.read_json('ppl', key, 'ppl.json')


def acts_stage(st: Study, params, prune_key: str, tokens_key: str, tokens: dict, label: str) -> tuple[str, Any]:
    """resid_post of the layer on the SAE training rows, BOS excluded, in an ActivationStore."""
    from prunesae_jax.sae.store import ActivationStore, capture_activations  # pylint: disable=g-import-not-at-top

    rows, bsz = tokens['train'], st.config.sae.capture_batch

    def capture(path) -> None:
        bar = progress_bar(
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
    key = cached(st, 'acts', spec, [prune_key, tokens_key], lambda: {'store': EachProcess(capture)}, shared=True)
    return key, ActivationStore(str(st.cache.path('acts', key) / 'store'))


def sae_stage(st: Study, acts_key: str, store, label: str, seed: int) -> tuple[str, dict, dict]:
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
        progress_line(
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

    key = cached(st, 'sae', spec, [acts_key], train, shared=True)
    if work.exists() and sharding.is_main():  # also when a run was killed between the commit and this cleanup
        shutil.rmtree(work, ignore_errors=True)
    record = st.cache.read_json('sae', key, 'final.json')
    training = st.cache.read_npz('sae', key, 'training.npz')
    record['snapshots'] = {int(k.split('@')[1]): v for k, v in training.items() if k.startswith('W_dec@')}
    record['firing_rate'] = training['firing_rate']
    return key, st.cache.read_npz('sae', key, 'params.npz'), record


def causal_stage(st: Study, dense_sae_key: str, dense_sae: dict, tokens_key: str, tokens: dict) -> tuple[str, Any]:
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
        key = cached(
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


class LazyDense(dict):
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


def dense_reference(
    st: Study, params, sae: dict, sae_key: str, record: dict, ppl: float, tokens_key: str, tokens: dict
) -> LazyDense:
    causal_key, effects = causal_stage(st, sae_key, sae, tokens_key, tokens)
    ana, d_model = st.config.analysis, st.model.cfg.hidden_size
    return LazyDense(
        {
            'causal': effects,
            'dictionary': lambda: (
                st.dictionary or (sae_config(st.config, d_model), splice.one_seed(sae), 'dense SAE (seed 0)')
            ),
            'heldout_x': lambda: transfer.heldout_activations(
                st.model.cfg, params, st.rows(tokens, ana.transfer_tokens), st.layer, st.config.sae.capture_batch
            ),
            'W_init': lambda: initial_decoders(st, len(sae['W_dec'])),
        },
        sae=sae,
        record=record,
        sae_key=sae_key,
        ppl=ppl,
        causal_key=causal_key,
    )


def initial_decoders(st: Study, n_seeds: int) -> np.ndarray:
    from prunesae_jax.sae.train import initial_decoder  # pylint: disable=g-import-not-at-top

    return initial_decoder(sae_config(st.config, st.model.cfg.hidden_size), st.config.sae.seed, n_seeds)


def measures_stage(
    st: Study,
    method: str,
    sparsity: float,
    params,
    keys: dict,
    sae: dict,
    record: dict,
    dense: LazyDense,
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

    key = cached(
        st,
        'measures',
        spec,
        [keys['sae'], keys['dense_sae'], keys['prune'], keys['tokens'], keys['causal']],
        measure_all,
    )
    return st.cache.read_json('measures', key, 'measures.json')
