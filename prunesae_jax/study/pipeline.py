"""run(config, workdir): the study's grid, condition by condition, cached and resumable.

For the model: load -> tokens -> for each condition (dense first, then method x sparsity):
prune -> perplexity -> capture resid_post activations to a store -> train S seeds of SAEs in
one compiled step -> the registered measures (prunesae_jax/analysis/measures/) against the dense
condition -> results.json and the report. The stages and their cache keys are in stages.py; this
module only orders them over the grid, names the condition in errors and writes the results.
The protocol choices are in docs/method.md.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from prunesae_jax import sharding
from prunesae_jax.analysis.measures import stability
from prunesae_jax.errors import NonFiniteError
from prunesae_jax.io import atomic_write_json
from prunesae_jax.study import inputs, stages
from prunesae_jax.study import report as report_lib
from prunesae_jax.study.config import (
    condition_seed,
    conditions_of,
    validate,
)
from prunesae_jax.study.workdir import StageCache, hold_workdir, provenance, set_activity, write_config

__all__ = ['run']


# --------------------------------------------------------------------------- the grid


def _run_condition(
    st: stages.Study, method: str, sparsity: float, tokens_key: str, tokens: dict, dense: stages.LazyDense | None
) -> tuple[dict, stages.LazyDense]:
    """One condition through every stage: (its results.json entry, the dense reference)."""
    config = st.config
    label = 'dense' if method == 'dense' else f'{method} {sparsity:.0%}'
    prune_key, params, prune_report = stages.prune_stage(st, method, sparsity, tokens_key, tokens)
    params = sharding.place_params(params, config.mesh.model_sharding, config.mesh.model, st.model.cfg)
    ppl = stages.ppl_stage(st, params, prune_key, tokens_key, tokens)
    acts_key, store = stages.acts_stage(st, params, prune_key, tokens_key, tokens, label)
    sae_key, sae, record = stages.sae_stage(st, acts_key, store, label, condition_seed(config, method, sparsity))
    if method == 'dense':
        dense = stages.dense_reference(st, params, sae, sae_key, record, ppl['ppl'], tokens_key, tokens)
    keys = {
        'sae': sae_key,
        'dense_sae': dense['sae_key'],
        'prune': prune_key,
        'tokens': tokens_key,
        'causal': dense['causal_key'],
    }
    m = stages.measures_stage(st, method, sparsity, params, keys, sae, record, dense, tokens)
    group = None if method == 'dense' else (config.pruning.group[method] or None)
    where = {'model': st.model.spec, 'layer': st.layer, 'method': method, 'sparsity': sparsity, 'group': group}
    return report_lib.condition_entry(where, prune_report, ppl, dense['ppl'], m, record), dense


def _run_model(st: stages.Study, where: dict) -> tuple[dict, list[dict]]:
    """The grid on one loaded model; `where` names the condition being run (for error messages).

    Each condition's pruned params are dropped before the next prune: never two pruned copies.
    """
    tokens_key, tokens = stages.tokens_stage(st)
    dense, conds = None, []
    for method, sparsity in stages.progress_bar(
        st.config, conditions_of(st.config), desc=f'{st.model.spec} conditions', unit='cond'
    ):
        where['condition'] = 'dense' if method == 'dense' else f'{method}@{sparsity:g}'
        set_activity(condition=where['condition'])  # for the launcher's line on an interrupt
        cond, dense = _run_condition(st, method, sparsity, tokens_key, tokens, dense)
        conds.append(cond)
        stages.progress_line(st.config, report_lib.format_condition(cond))
    cfg = st.model.cfg
    n_latents = st.config.sae.expansion * cfg.hidden_size
    return report_lib.model_entry(cfg, st.layer, n_latents, dense['ppl']), conds


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Runs (or resumes) the study; writes results.json, timings.json, tables, figures, report.md.

    Returns the results dict (schema in prunesae_jax/study/report.py). Raises ConfigError (an
    InputError) before any work for a bad config, InputError for a bad checkpoint or corpus (the
    model is loaded and checked before the workdir is touched), NonFiniteError naming the stage,
    condition, layer and step when NaN / inf appears, and workdir.WorkdirBusy (an InputError) when
    another live run holds the workdir.

    Under jax.distributed every process calls run() with the same config and one shared workdir;
    each does its share of the calibration, capture and SAE batches, process 0 computes the rest
    and writes the files, and every process returns the same results (stages.py).
    """
    validate(config)
    t0 = time.perf_counter()
    timings = stages.Timings()
    set_activity('load model', condition=None)
    model, layer, dictionary = inputs.load(config)  # a bad checkpoint, layer or N:M width fails before any write
    timings.add('load_model', time.perf_counter() - t0)
    workdir = Path(workdir)
    # Under jax.distributed every process runs this with one shared workdir (see stages.py):
    # process 0 holds it and writes the shared files, the others write only their shards.
    main = sharding.is_main()
    # Creates the workdir; one live run per workdir; removes what killed runs left.
    with hold_workdir(workdir) if main else contextlib.nullcontext():
        if main:
            write_config(workdir, config)  # a changed config first removes the old config's results
        sharding.barrier('workdir held')
        st = stages.Study(config, model, layer, dictionary, StageCache(workdir), timings)
        results = _run_held(st, workdir, t0)
        sharding.barrier('results written')  # the processes finish together (see BUILD.md, failures)
        return results


def _run_held(st: stages.Study, workdir: Path, t0: float) -> dict[str, Any]:
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
    agreement = stability.survival_tau_agreement([c for c in conds if c['method'] != 'dense'], config.analysis.taus)
    results = report_lib.results_entry(config, prov, {config.model: info}, conds, agreement)
    if not sharding.is_main():  # every process returns the results; process 0 writes them
        return results
    atomic_write_json(workdir / 'results.json', results)
    t_report = time.perf_counter()
    # The report is a function of results.json alone (byte-identical across runs and resumes);
    # wall-clock times live in timings.json only.
    report_lib.write_report(results, workdir)
    st.timings.add('report', time.perf_counter() - t_report)
    st.timings['total_s'] = round(time.perf_counter() - t0, 3)
    atomic_write_json(workdir / 'timings.json', st.timings)
    return results
