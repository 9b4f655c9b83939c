"""Tables, figures and report.md from a study's results.

`write_report(results, workdir)` reads nothing but the results dict, so it can
be re-run on any results.json (`python -c "from prunesae_jax.study import report;
report.write_report(report.load_results('w/results.json'), 'w')"`).

The results.json schema ('prunesae_jax.results/1'); an Interval is
{"estimate": float, "low": float, "high": float}, and a seed-bootstrap Interval may add
"min", "max" (the range of the seed-pair values it averages) and "n_seeds" (printed beside
the CI when n_seeds < 5); a number may be null when a measure does not apply (e.g. transfer
of the dense condition onto itself is still reported, fragility of the dense condition is
null); a CI given as [low, high] is optional wherever it appears:

  schema       'prunesae_jax.results/1'
  name         the config's name
  config       the validated config (plain JSON); read here: analysis.{tau, taus, n_bootstrap, ci, seed,
               min_seed_floor (default 0.2)}, sae.{n_seeds, expansion, architecture, k, n_tokens}
  provenance   {versions: {package: version}, git_revision, device: {platform, device_kind, ...}}
  models       {model: {family, num_layers, d_model, layer, n_latents, dense_ppl}}
  conditions   list, the dense condition of each model first, then method x sparsity in config order:
    model, layer, method ('dense' | 'magnitude' | 'wanda' | 'sparsegpt'), sparsity (target, 0 for dense),
    achieved_sparsity (fraction of prunable weights that are zero), achieved_by_kind
    ({attention, mlp}: the same per kind of matrix), group (null for dense),
    ppl, ppl_ci ([low, high], optional), delta_log_ppl (log ppl - log dense ppl),
    stability   RQ1 within this condition's seeds at tau:
                {shared: Interval (+ min, max, n_seeds), divergence: Interval, n_pairs, kendalls_w,
                 by_tau: {"0.6": mean shared fraction, ...}}; the dense condition's shared estimate is
                the seed floor that decides whether survival is readable (see READABILITY)
    survival    RQ2 dense SAEs vs this condition's SAEs (dense vs dense = across seeds):
                {estimate, low, high (+ min, max, n_seeds), fractions: [per seed pair],
                 pairs: [[dense seed, pruned seed] per fraction] (optional; without it the pairs are
                 inferred from pairing and sae.n_seeds: the full grid row-major, i != j row-major for
                 'distinct', (s, s) for 'shared'), pairing: 'distinct' | 'shared' (optional),
                 null: Interval (for 'shared': the survival that the shared initialisations alone give),
                 by_tau: {"0.6": float, ...}, mean_max_cos: mean over dense features and seed pairs of the
                 max cosine to the other dictionary (threshold-free)}
    fragility   RQ4 (null for dense): {per_quintile: [n_q] survival Q1 (rarest) .. Q5,
                per_quintile_ci: [[low, high]] * n_q or null, effect: Interval S(Q1) - S(Q5),
                rho_quintile: float, rho_feature: Interval Spearman(firing rate, survival)},
                or {not_run: '<reason>'}
    transfer    RQ3 the fixed dictionary on this condition's activations:
                {dictionary: 'dense' | repo/path, fvu, l0, jaccard (active sets vs the dense model, token
                by token), ce_clean, ce_spliced, ce_zero, ce_recovered, kl; optional fvu_ci, jaccard_ci,
                ce_recovered_ci: [low, high]}
    causal      RQ5 (null for dense): {n_features, n_live (features that fire on the causal tokens),
                measure: 'exact' | 'attribution' (the effects correlated), correlation: Interval
                Spearman(max cosine survival, |effect|) over live features, correlation_signed (or
                signed): Interval Spearman(survival, effect), agreement: float or Interval (Spearman of
                attribution vs exact ablation over the exactly ablated features), agreement_features:
                how many were ablated, max_cos: [k], effect: [k]}; a results.json without a signed
                correlation is older: its correlation is with the signed effect
    sae         training quality per seed: {fvu: [S], l0: [S], dead_frac: [S]}
    convergence SAE training (optional): {n_steps, batch_size, train_tokens (unique tokens),
                steps: [snapshot steps], tokens: [steps * batch_size], shared: [seed-pair shared fraction
                at tau at each snapshot, mean over pairs], init_cos: [per seed, mean cosine of final vs
                initial decoder rows], fvu: [S], l0: [S], dead_frac: [S],
                curve: {step, fvu, l0, dead_frac, aux_loss: [means over seeds at each logged step]}}
  tau_agreement  {taus: [...], kendalls_w: float}  agreement of the taus' rankings of the conditions
  claims       list of {id, claim, holds: true | false | null, status, evidence, paper} (from
               summarize_claims); status is 'holds' | 'fails' | 'not resolved' | 'not readable' |
               'not tested' and holds is true / false only for 'holds' / 'fails'

READABILITY: survival is only meaningful when SAEs of different seeds agree with each other. When
the dense condition's seed floor (stability.shared.estimate) is below analysis.min_seed_floor, the
claims built on survival (wanda_beats_magnitude, rare_survive_better, survival_not_causal) are
'not readable' whatever their numbers say, and report.md says so at the top.

Outputs: tables/{conditions, perplexity, seed_stability, survival, survival_by_quintile, fragility,
transfer, causal, diagnostics, convergence}.csv, figures/{survival_vs_sparsity, survival_by_quintile,
transfer_vs_sparsity, ppl_vs_sparsity, survival_vs_causal, seed_agreement}.png, report.md.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prunesae_jax.errors import InputError
from prunesae_jax.io import atomic_write_bytes, atomic_write_text, to_jsonable

__all__ = [
    'SCHEMA',
    'condition_entry',
    'model_entry',
    'results_entry',
    'load_results',
    'tables',
    'summarize_claims',
    'write_tables',
    'write_figures',
    'write_report',
    'format_condition',
]

SCHEMA = 'prunesae_jax.results/1'
TABLES = (
    'conditions',
    'perplexity',
    'seed_stability',
    'survival',
    'survival_by_quintile',
    'fragility',
    'transfer',
    'causal',
    'diagnostics',
    'convergence',
)
FIGURES = (
    'survival_vs_sparsity',
    'survival_by_quintile',
    'transfer_vs_sparsity',
    'ppl_vs_sparsity',
    'survival_vs_causal',
    'seed_agreement',
)

# Below this dense seed floor (config analysis.min_seed_floor overrides it) survival is noise.
DEFAULT_MIN_SEED_FLOOR = 0.2
# Fewer seeds than this: print the range of the pair values beside a seed-bootstrap CI.
FEW_SEEDS = 5
# survival_not_causal holds only when the CI of rho(survival, |effect|) lies inside (-band, band).
EQUIVALENCE_BAND = 0.3
STATUSES = ('holds', 'fails', 'not resolved', 'not readable', 'not tested')
# The paper's Spearman correlations of each diagnostic with delta log PPL over 17 pruned conditions.
PAPER_DIAGNOSTICS = {'jaccard': -0.975, 'survival': -0.684, 'fvu': 0.556, 'fragility': -0.032}


def condition_entry(
    where: Mapping[str, Any],
    prune_report: Mapping[str, Any],
    ppl: Mapping[str, Any],
    dense_ppl: float,
    measures: Mapping[str, Any],
    record: Mapping[str, Any],
) -> dict[str, Any]:
    """One entry of results.json's conditions (the schema above): where (model, layer, method,
    sparsity, group), the pruning report, the perplexity record, the measures and the SAE record."""
    return {
        **{k: where[k] for k in ('model', 'layer', 'method', 'sparsity')},
        'achieved_sparsity': float(prune_report.get('overall', 0.0)),
        'achieved_by_kind': prune_report.get('per_kind'),
        'group': where['group'],
        'ppl': ppl['ppl'],
        'ppl_ci': ppl.get('ppl_ci'),
        'ppl_tokens': ppl['n_tokens'],
        'delta_log_ppl': math.log(ppl['ppl']) - math.log(dense_ppl),
        **measures,
        'sae': {k: record[k] for k in ('fvu', 'l0', 'dead_frac') if k in record},
    }


def model_entry(cfg: Any, layer: int, n_latents: int, dense_ppl: float) -> dict[str, Any]:
    """results.json's models[model]: the decoder's shape, the layer, the dictionary size, dense ppl."""
    return {
        'family': cfg.family,
        'num_layers': cfg.num_layers,
        'd_model': cfg.hidden_size,
        'layer': layer,
        'n_latents': n_latents,
        'dense_ppl': dense_ppl,
    }


def results_entry(
    config: Any,
    provenance: Mapping[str, Any],
    models: Mapping[str, Any],
    conditions: list[dict[str, Any]],
    tau_agreement: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The whole results.json (plain JSON) with its claims: what write_report reads."""
    results = {
        'schema': SCHEMA,
        'name': config.name,
        'config': to_jsonable(config),
        'provenance': provenance,
        'models': models,
        'conditions': conditions,
    }
    if tau_agreement is not None:
        results['tau_agreement'] = tau_agreement
    results['claims'] = summarize_claims(results)
    return to_jsonable(results)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a results.json and checks its schema tag."""
    with open(path, encoding='utf-8') as f:
        results = json.load(f)
    if results.get('schema') != SCHEMA:
        raise InputError(f'{path}: schema {results.get("schema")!r} is not {SCHEMA!r}')
    return results


# --------------------------------------------------------------------------- small helpers


def _get(d: Any, *keys: Any) -> Any:
    """Nested lookup that returns None as soon as a level is missing or null."""
    for k in keys:
        if d is None:
            return None
        if isinstance(d, Mapping):
            d = d.get(k)
        elif isinstance(d, Sequence) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return None
    return d


def _finite_float(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(x: Any, digits: int = 3) -> str:
    f = _finite_float(x)
    if f is None:
        return 'n/a'
    if f != 0 and (abs(f) >= 1e4 or abs(f) < 10**-digits):
        return f'{f:.{digits}g}'
    return f'{f:.{digits}f}'


def _fmt_ci(iv: Any, digits: int = 3) -> str:
    """'0.794 [0.75, 0.83]' from an Interval dict; with fewer than FEW_SEEDS seeds and the pair
    range given, '0.794 [0.75, 0.83] (pairs 0.74..0.85, 3 seeds)'."""
    est = _get(iv, 'estimate')
    lo, hi = _get(iv, 'low'), _get(iv, 'high')
    if _finite_float(lo) is None or _finite_float(hi) is None:
        return _fmt(est, digits)
    return f'{_fmt(est, digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]{_fmt_range(iv, digits)}'


def _fmt_range(iv: Any, digits: int = 3) -> str:
    """' (pairs 0.74..0.85, 3 seeds)' when the interval rests on fewer than FEW_SEEDS seeds."""
    n = _finite_float(_get(iv, 'n_seeds'))
    mn, mx = _finite_float(_get(iv, 'min')), _finite_float(_get(iv, 'max'))
    if n is None or n >= FEW_SEEDS or mn is None or mx is None:
        return ''
    return f' (pairs {_fmt(mn, digits)}..{_fmt(mx, digits)}, {int(n)} seeds)'


def _fmt_sci(iv: Any, digits: int = 3) -> str:
    """Signed '+0.450 [+0.40, +0.50]' of an Interval dict (with the range, as _fmt_ci)."""
    est, lo, hi = _finite_float(_get(iv, 'estimate')), _finite_float(_get(iv, 'low')), _finite_float(_get(iv, 'high'))
    if est is None:
        return 'n/a'
    if lo is None or hi is None:
        return _fmt_signed(est, digits)
    rng = ''
    n, mn, mx = _finite_float(_get(iv, 'n_seeds')), _finite_float(_get(iv, 'min')), _finite_float(_get(iv, 'max'))
    if n is not None and n < FEW_SEEDS and mn is not None and mx is not None:
        rng = f' (per dense seed {_fmt_signed(mn, digits)}..{_fmt_signed(mx, digits)}, {int(n)} seeds)'
    return f'{_fmt_signed(est, digits)} [{_fmt_signed(lo, digits)}, {_fmt_signed(hi, digits)}]{rng}'


def _ci_list(value: Any, ci: Any) -> dict[str, Any]:
    """An Interval dict from a value and an optional [low, high]."""
    return {'estimate': value, 'low': _get(ci, 0), 'high': _get(ci, 1)}


def _fmt_signed(x: float, digits: int = 3) -> str:
    """Signed _fmt: '+0.450', '-6.51e-05'."""
    return ('-' if x < 0 else '+') + _fmt(abs(x), digits)


def _pct(s: float) -> str:
    return f'{100 * s:.0f}%'


def _csv_value(v: Any) -> str:
    if v is None:
        return ''
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return '' if not math.isfinite(v) else format(v, '.6g')
    return str(v)


def format_condition(cond: Mapping[str, Any]) -> str:
    """One line per condition, as the pipeline logs it."""
    label = 'dense' if cond['method'] == 'dense' else f'{cond["method"]} {_pct(cond["sparsity"])}'
    parts = [
        f'{cond["model"]} L{cond.get("layer")} {label}:',
        f'ppl {_fmt(cond.get("ppl"), 2)} (dlogppl {_fmt(cond.get("delta_log_ppl"))})',
        f'survival {_fmt_ci(cond.get("survival"))}',
        f'stability {_fmt(_get(cond, "stability", "shared", "estimate"))}',
    ]
    if cond.get('fragility'):
        parts.append(f'S(Q1)-S(Q5) {_fmt(_get(cond, "fragility", "effect", "estimate"))}')
    if cond.get('transfer'):
        parts.append(
            f'transfer FVU {_fmt(_get(cond, "transfer", "fvu"))} CE rec {_fmt(_get(cond, "transfer", "ce_recovered"))}'
        )
    if cond.get('causal'):
        parts.append(f'rho(surv, causal) {_fmt(_get(cond, "causal", "correlation", "estimate"))}')
    return ' | '.join(parts)


def _dense(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c['model']: c for c in results['conditions'] if c['method'] == 'dense'}


def _pruned(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [c for c in results['conditions'] if c['method'] != 'dense']


def _condition_key(c: Mapping[str, Any]) -> dict[str, Any]:
    return {'model': c['model'], 'method': c['method'], 'sparsity': c['sparsity']}


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    pairs = [(a, b) for a, b in zip(x, y) if _finite_float(a) is not None and _finite_float(b) is not None]
    if len(pairs) < 3:
        return None
    from prunesae_jax.analysis.stats import spearman  # pylint: disable=g-import-not-at-top

    return _finite_float(spearman(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])))


# --------------------------------------------------------------------------- tables


def _mean(xs: Any) -> float | None:
    many = isinstance(xs, Sequence) and not isinstance(xs, str)
    vals = [_finite_float(x) for x in xs or []] if many else [_finite_float(xs)]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _snapshot_pct(conv: Mapping[str, Any]) -> list[tuple[int, float | None, float | None]]:
    """[(percent of n_steps, shared fraction, tokens)] of a convergence record's snapshots."""
    n = _finite_float(conv.get('n_steps'))
    steps = conv.get('steps') or []
    shared = conv.get('shared') or []
    tokens = conv.get('tokens') or []
    out = []
    for i, st in enumerate(steps):
        if _finite_float(st) is None or not n:
            continue
        out.append((int(round(100 * float(st) / n)), _finite_float(_get(shared, i)), _finite_float(_get(tokens, i))))
    return out


def _plateau(conv: Mapping[str, Any] | None) -> tuple[float, float, int, int] | None:
    """(shared at the snapshot nearest 50 % of the steps, shared at the last snapshot, their
    percents) or None when fewer than two snapshots have a shared fraction."""
    snaps = [(p, v) for p, v, _ in _snapshot_pct(conv or {}) if v is not None]
    if len(snaps) < 2:
        return None
    last = max(snaps, key=lambda t: t[0])
    mid = min((t for t in snaps if t is not last), key=lambda t: (abs(t[0] - 50), -t[0]))
    return mid[1], last[1], mid[0], last[0]


def tables(results: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every CSV table as a list of rows (dicts with the same keys in the same order)."""
    dense = _dense(results)
    conds = results['conditions']
    taus = [str(t) for t in _get(results, 'config', 'analysis', 'taus') or []]
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES}
    has_pairing = any(_get(c, 'survival', 'pairing') is not None for c in conds)
    has_null = any(_get(c, 'survival', 'null') is not None for c in conds)
    pcts = sorted({p for c in conds for p, _, _ in _snapshot_pct(c.get('convergence') or {})})

    for c in conds:
        floor = _get(dense.get(c['model']), 'stability', 'shared')
        out['conditions'].append(
            {
                **_condition_key(c),
                'layer': c.get('layer'),
                'achieved_sparsity': c.get('achieved_sparsity'),
                'ppl': c.get('ppl'),
                'ppl_low': _get(c, 'ppl_ci', 0),
                'ppl_high': _get(c, 'ppl_ci', 1),
                'delta_log_ppl': c.get('delta_log_ppl'),
                'survival': _get(c, 'survival', 'estimate'),
                'survival_low': _get(c, 'survival', 'low'),
                'survival_high': _get(c, 'survival', 'high'),
                'mean_max_cos': _get(c, 'survival', 'mean_max_cos'),
                'seed_floor': _get(floor, 'estimate'),
                'seed_floor_low': _get(floor, 'low'),
                'seed_floor_high': _get(floor, 'high'),
            }
        )
        out['perplexity'].append(
            {
                **_condition_key(c),
                'group': c.get('group'),
                'achieved_sparsity': c.get('achieved_sparsity'),
                'achieved_attention': _get(c, 'achieved_by_kind', 'attention'),
                'achieved_mlp': _get(c, 'achieved_by_kind', 'mlp'),
                'ppl': c.get('ppl'),
                'ppl_low': _get(c, 'ppl_ci', 0),
                'ppl_high': _get(c, 'ppl_ci', 1),
                'delta_log_ppl': c.get('delta_log_ppl'),
            }
        )
        st = c.get('stability') or {}
        out['seed_stability'].append(
            {
                **_condition_key(c),
                'tau': _get(results, 'config', 'analysis', 'tau'),
                'shared': _get(st, 'shared', 'estimate'),
                'shared_low': _get(st, 'shared', 'low'),
                'shared_high': _get(st, 'shared', 'high'),
                'shared_min': _get(st, 'shared', 'min'),
                'shared_max': _get(st, 'shared', 'max'),
                'n_seeds': _get(st, 'shared', 'n_seeds'),
                'divergence': _get(st, 'divergence', 'estimate'),
                'divergence_low': _get(st, 'divergence', 'low'),
                'divergence_high': _get(st, 'divergence', 'high'),
                'n_pairs': st.get('n_pairs'),
                'kendalls_w': st.get('kendalls_w'),
            }
        )
        sv = c.get('survival') or {}
        row = {
            **_condition_key(c),
            'survival': sv.get('estimate'),
            'survival_low': sv.get('low'),
            'survival_high': sv.get('high'),
            'survival_min': sv.get('min'),
            'survival_max': sv.get('max'),
            'n_seeds': sv.get('n_seeds'),
            'n_pairs': len(sv.get('fractions') or []),
        }
        if has_pairing:
            row['pairing'] = sv.get('pairing')
        if has_null:
            row.update(
                null=_get(sv, 'null', 'estimate'), null_low=_get(sv, 'null', 'low'), null_high=_get(sv, 'null', 'high')
            )
        for t in taus:
            row[f'survival_tau_{t}'] = _get(sv, 'by_tau', t)
        out['survival'].append(row)

        fr = c.get('fragility')
        if fr:
            per_q = fr.get('per_quintile') or []
            cis = fr.get('per_quintile_ci') or [None] * len(per_q)
            for q, (sq, ci) in enumerate(zip(per_q, cis), start=1):
                out['survival_by_quintile'].append(
                    {**_condition_key(c), 'quintile': q, 'survival': sq, 'low': _get(ci, 0), 'high': _get(ci, 1)}
                )
            out['fragility'].append(
                {
                    **_condition_key(c),
                    's_q1': _get(per_q, 0),
                    's_q5': _get(per_q, -1),
                    'effect': _get(fr, 'effect', 'estimate'),
                    'effect_low': _get(fr, 'effect', 'low'),
                    'effect_high': _get(fr, 'effect', 'high'),
                    'rho_quintile': fr.get('rho_quintile'),
                    'rho_feature': _get(fr, 'rho_feature', 'estimate'),
                    'rho_feature_low': _get(fr, 'rho_feature', 'low'),
                    'rho_feature_high': _get(fr, 'rho_feature', 'high'),
                    'not_run': fr.get('not_run'),
                }
            )
        tr = c.get('transfer')
        if tr:
            row = {**_condition_key(c), 'dictionary': tr.get('dictionary')}
            for k in ('fvu', 'l0', 'jaccard', 'ce_clean', 'ce_spliced', 'ce_zero', 'ce_recovered', 'kl'):
                row[k] = tr.get(k)
                if k in ('fvu', 'jaccard', 'ce_recovered'):
                    row[f'{k}_low'], row[f'{k}_high'] = _get(tr, f'{k}_ci', 0), _get(tr, f'{k}_ci', 1)
            out['transfer'].append(row)
        ca = c.get('causal')
        if ca:
            ag = ca.get('agreement')
            ag = ag if isinstance(ag, Mapping) else {'estimate': ag}
            out['causal'].append(
                {
                    **_condition_key(c),
                    'measure': ca.get('measure'),
                    'n_features': ca.get('n_features'),
                    'n_live': ca.get('n_live'),
                    'target': '|effect|' if _signed_correlation(ca) is not None else 'effect',
                    'rho': _get(ca, 'correlation', 'estimate'),
                    'rho_low': _get(ca, 'correlation', 'low'),
                    'rho_high': _get(ca, 'correlation', 'high'),
                    'rho_signed': _get(_signed_correlation(ca), 'estimate'),
                    'rho_signed_low': _get(_signed_correlation(ca), 'low'),
                    'rho_signed_high': _get(_signed_correlation(ca), 'high'),
                    'agreement': ag.get('estimate'),
                    'agreement_low': ag.get('low'),
                    'agreement_high': ag.get('high'),
                    'agreement_features': ca.get('agreement_features'),
                }
            )
        cv = c.get('convergence')
        if cv:
            n_steps, bs = _finite_float(cv.get('n_steps')), _finite_float(cv.get('batch_size'))
            seen = n_steps * bs if n_steps is not None and bs is not None else None
            unique = _finite_float(cv.get('train_tokens'))
            row = {
                **_condition_key(c),
                'n_steps': cv.get('n_steps'),
                'batch_size': cv.get('batch_size'),
                'train_tokens': cv.get('train_tokens'),
                'tokens_seen': int(seen) if seen is not None else None,
                'epochs': seen / unique if seen is not None and unique else None,
            }
            snaps = {p: v for p, v, _ in _snapshot_pct(cv)}
            for p in pcts:
                row[f'shared_{p}pct'] = snaps.get(p)
            sae = c.get('sae') or {}
            row.update(
                init_cos=_mean(cv.get('init_cos')),
                fvu=_mean(cv.get('fvu') if cv.get('fvu') is not None else sae.get('fvu')),
                l0=_mean(cv.get('l0') if cv.get('l0') is not None else sae.get('l0')),
                dead_frac=_mean(cv.get('dead_frac') if cv.get('dead_frac') is not None else sae.get('dead_frac')),
            )
            out['convergence'].append(row)

    # The paper's diagnostic table: each diagnostic's Spearman with delta log PPL over pruned conditions.
    pruned = _pruned(results)
    dlp = [c.get('delta_log_ppl') for c in pruned]
    diag = {
        'jaccard': [_get(c, 'transfer', 'jaccard') for c in pruned],
        'survival': [_get(c, 'survival', 'estimate') for c in pruned],
        'fvu': [_get(c, 'transfer', 'fvu') for c in pruned],
        'fragility': [_get(c, 'fragility', 'effect', 'estimate') for c in pruned],
    }
    for name, vals in diag.items():
        n = sum(_finite_float(a) is not None and _finite_float(b) is not None for a, b in zip(vals, dlp))
        out['diagnostics'].append(
            {
                'diagnostic': name,
                'spearman_vs_delta_log_ppl': _spearman(vals, dlp),
                'n_conditions': n,
                'paper': PAPER_DIAGNOSTICS[name],
            }
        )
    return out


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator='\n')
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(v) for k, v in r.items()})
    return buf.getvalue()


def write_tables(results: Mapping[str, Any], workdir: str | os.PathLike) -> dict[str, Path]:
    """Writes tables/<name>.csv for every table (an empty table is a file with no rows)."""
    paths = {}
    for name, rows in tables(results).items():
        paths[name] = atomic_write_text(Path(workdir) / 'tables' / f'{name}.csv', _csv_text(rows))
    return paths


# --------------------------------------------------------------------------- claims


def _bootstrap_diff(
    a: Sequence[float], b: Sequence[float], n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> dict[str, Any] | None:
    """mean(a) - mean(b) with a percentile bootstrap resampling a and b independently: the
    fallback when the seed pairs behind the values are not known."""
    a = np.asarray([x for x in a if _finite_float(x) is not None], dtype=np.float64)
    b = np.asarray([x for x in b if _finite_float(x) is not None], dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return None
    from prunesae_jax.analysis import stats  # pylint: disable=g-import-not-at-top

    iv = stats.difference_ci(a, b, n_boot, ci, seed)
    return {'estimate': iv.estimate, 'low': iv.low, 'high': iv.high}


def _boot_args(results: Mapping[str, Any]) -> dict[str, Any]:
    """n_boot, ci, seed of the config's analysis section (the pipeline's defaults if absent)."""
    ana = _get(results, 'config', 'analysis') or {}
    n_boot = _finite_float(ana.get('n_bootstrap'))
    level = _finite_float(ana.get('ci'))
    seed = _finite_float(ana.get('seed'))
    return {
        'n_boot': max(int(n_boot), 1) if n_boot is not None else 2000,
        'ci': level if level is not None and 0 < level < 1 else 0.95,
        'seed': int(seed) if seed is not None else 0,
    }


def _survival_pairs(results: Mapping[str, Any], c: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(fractions [P], pairs [P, 2] of (dense seed, pruned seed)) of a condition's survival, from
    survival.pairs, else inferred from survival.pairing and sae.n_seeds; None when unknown."""
    sv = c.get('survival') or {}
    raw = sv.get('fractions') or []
    vals = [_finite_float(x) for x in raw]
    if not vals or any(v is None for v in vals):
        return None
    pairs = sv.get('pairs')
    n = _finite_float(_get(results, 'config', 'sae', 'n_seeds'))
    n = int(n) if n is not None else 0
    pairing = sv.get('pairing')
    if isinstance(pairs, Sequence) and len(pairs) == len(vals):
        p = [tuple(int(v) for v in q) for q in pairs]
    elif pairing == 'shared' and len(vals) == n:
        p = [(i, i) for i in range(n)]
    elif pairing == 'distinct' and n >= 2 and len(vals) == n * (n - 1):
        p = [(i, j) for i in range(n) for j in range(n) if i != j]
    elif pairing is None and n >= 1 and len(vals) == n * n:
        p = [(i, j) for i in range(n) for j in range(n)]
    else:
        return None
    return np.asarray(vals, np.float64), np.asarray(p, np.int64).reshape(-1, 2)


def _survival_diff(
    results: Mapping[str, Any], ca: Mapping[str, Any], cb: Mapping[str, Any]
) -> tuple[dict[str, Any] | None, str]:
    """survival(ca) - survival(cb) with its CI and a note on how it was resampled. Both
    conditions are compared with the same dense seeds, so those are resampled jointly and each
    condition's pruned seeds independently (stats.seed_difference_ci)."""
    from prunesae_jax.analysis import stats  # pylint: disable=g-import-not-at-top

    boot = _boot_args(results)
    a, b = _survival_pairs(results, ca), _survival_pairs(results, cb)
    if a is not None and b is not None:
        matched = bool(np.all(a[1][:, 0] == a[1][:, 1]) and np.all(b[1][:, 0] == b[1][:, 1]))
        n_dense = int(max(a[1][:, 0].max(), b[1][:, 0].max())) + 1
        iv = stats.seed_difference_ci(a[0], a[1], b[0], b[1], n_dense, matched=matched, **boot)
        how = 'matched seeds resampled' if matched else 'dense seeds resampled jointly, pruned seeds apart'
        return iv._asdict(), how
    sa, sb = _get(ca, 'survival', 'estimate'), _get(cb, 'survival', 'estimate')
    diff = _bootstrap_diff(_get(ca, 'survival', 'fractions') or [sa], _get(cb, 'survival', 'fractions') or [sb], **boot)
    return diff, 'seed pairs unknown: pair values resampled independently'


def _ci_side(iv: Any, lo_bound: float = 0.0, hi_bound: float = 0.0) -> str:
    """'above' when the CI lies above lo_bound, 'below' when below hi_bound, else 'straddles'
    (also when the CI is missing)."""
    lo, hi = _finite_float(_get(iv, 'low')), _finite_float(_get(iv, 'high'))
    if lo is None or hi is None:
        return 'no CI'
    if lo > lo_bound:
        return 'above'
    if hi < hi_bound:
        return 'below'
    return 'straddles'


def _ci_side_text(side: str) -> str:
    return {'above': 'CI above 0', 'below': 'CI below 0', 'straddles': 'CI contains 0'}.get(side, side)


def _min_seed_floor(results: Mapping[str, Any]) -> float:
    v = _finite_float(_get(results, 'config', 'analysis', 'min_seed_floor'))
    return DEFAULT_MIN_SEED_FLOOR if v is None else v


def _readability(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """model -> {floor, threshold, readable, plateau}: survival of a model is readable when the
    dense condition's seed floor (seed-pair shared fraction at tau) reaches min_seed_floor. A
    model without a dense seed floor counts as readable (nothing says otherwise)."""
    t = _min_seed_floor(results)
    out = {}
    for model in sorted({c['model'] for c in results['conditions']}):
        d = _dense(results).get(model)
        floor = _finite_float(_get(d, 'stability', 'shared', 'estimate'))
        out[model] = {
            'floor': floor,
            'floor_iv': _get(d, 'stability', 'shared'),
            'threshold': t,
            'readable': floor is None or floor >= t,
            'plateau': _plateau(_get(d, 'convergence')),
        }
    return out


def _unreadable_head(read: Mapping[str, Mapping[str, Any]], models: set[str]) -> str:
    parts = []
    for m in sorted(models):
        r = read[m]
        who = f' ({m})' if len(read) > 1 else ''
        parts.append(f'SAEs not converged{who}: dense seed floor {_fmt(r["floor"])} < threshold {_fmt(r["threshold"])}')
    return '; '.join(parts) + '. The numbers below are at the noise floor and decide nothing'


def _claim(cid: str, claim: str, status: str, head: str, lines: Sequence[str], paper: str) -> dict[str, Any]:
    """One claim dict: the headline `head` then one bullet per condition in `lines` as its evidence.
    holds is True / False only for status 'holds' / 'fails', else None."""
    assert status in STATUSES, status
    return {
        'id': cid,
        'claim': claim,
        'holds': {'holds': True, 'fails': False}.get(status),
        'status': status,
        'evidence': head + ('.\n' + '\n'.join(f'- {ln}' for ln in lines) if lines else '.'),
        'paper': paper,
    }


# Each claim read from the study: (the claim, what the paper reports, why it can be 'not tested').
_CLAIM_TEXT = {
    'wanda_beats_magnitude': (
        'Wanda preserves feature structure better than magnitude pruning (MNN survival at tau)',
        'up to 3.7x; Gemma 2 2B at 30%: 0.794 Wanda vs 0.210 magnitude',
        'needs both magnitude and Wanda at a common sparsity',
    ),
    'rare_survive_better': (
        'Rare features (firing-rate Q1) survive pruning better than frequent ones (Q5)',
        'v1: rho = -1.0 in 11 of 17 conditions; revision: rho between -0.540 and 0.062',
        'no pruned condition has fragility measures',
    ),
    'survival_not_causal': (
        "Geometric survival does not predict a feature's causal effect on the loss",
        'geometric survival does not predict causal importance',
        'no pruned condition has causal measures',
    ),
}


def _claim_if_readable(
    cid: str,
    lines: Sequence[str],
    decided: Sequence[str],
    status: str,
    head: str,
    read: Mapping[str, Mapping[str, Any]],
    unreadable: set[str],
) -> dict[str, Any]:
    """The claim with `status` and `head` decided by the readable conditions (`decided`, one entry
    each); 'not tested' (`untested` says why) when no condition has the measures, 'not readable'
    when none of those that have them is readable (the dense seed floor is too low); the models
    left out are named in the head. The claim's text is _CLAIM_TEXT[cid]."""
    claim, paper, untested = _CLAIM_TEXT[cid]
    if not decided and not unreadable:
        return _claim(cid, claim, 'not tested', f'not tested: {untested}', lines, paper)
    if not decided:
        return _claim(cid, claim, 'not readable', _unreadable_head(read, unreadable), lines, paper)
    if unreadable:
        head += f'; not readable for {", ".join(sorted(unreadable))} ({_unreadable_head(read, unreadable)})'
    return _claim(cid, claim, status, head, lines, paper)


def _unanimous(outcomes: Sequence[str], passed: str, failed: str) -> tuple[str, int, int]:
    """(status, n passed, n failed): 'holds' when every outcome is `passed`, 'fails' when any is
    `failed`, else 'not resolved'."""
    n_pass, n_fail = outcomes.count(passed), outcomes.count(failed)
    return ('holds' if n_pass == len(outcomes) else 'fails' if n_fail else 'not resolved'), n_pass, n_fail


def _ratio_text(sw: float, sm: float) -> str:
    if sm > 0:
        return f'ratio {sw / sm:.1f}x'
    if sw > 0:
        return 'no ratio: magnitude survival is 0'
    return 'no ratio: both survivals are 0'


def _claim_wanda(results: Mapping[str, Any]) -> dict[str, Any]:
    by = {(c['model'], c['method'], round(c['sparsity'], 6)): c for c in _pruned(results)}
    read = _readability(results)
    lines, sides, unreadable = [], [], set()
    for (model, method, s), cw in sorted(by.items()):
        if method != 'wanda' or (model, 'magnitude', s) not in by:
            continue
        cm = by[(model, 'magnitude', s)]
        sw, sm = _finite_float(_get(cw, 'survival', 'estimate')), _finite_float(_get(cm, 'survival', 'estimate'))
        if sw is None or sm is None:
            continue
        diff, how = _survival_diff(results, cw, cm)
        side = _ci_side(diff)
        if read[model]['readable']:
            sides.append(side)
        else:
            unreadable.add(model)
        lines.append(
            f'{model} {_pct(s)}: Wanda {_fmt_ci(cw["survival"])} vs magnitude '
            f'{_fmt_ci(cm["survival"])}; difference {_fmt_sci(diff)} ({how}; '
            f'{_ci_side_text(side)}); {_ratio_text(sw, sm)}'
        )
    status, n_above, n_below = _unanimous(sides, 'above', 'below')
    head = (
        f'the CI of survival(Wanda) - survival(magnitude) lies above 0 at {n_above} of {len(sides)} '
        f'sparsities and below 0 at {n_below} (holds only when above 0 at every sparsity)'
    )
    return _claim_if_readable('wanda_beats_magnitude', lines, sides, status, head, read, unreadable)


def _claim_rare(results: Mapping[str, Any]) -> dict[str, Any]:
    read = _readability(results)
    lines, sides, rhos, unreadable = [], [], [], set()
    for c in _pruned(results):
        fr = c.get('fragility')
        label = f'{c["model"]} {c["method"]} {_pct(c["sparsity"])}'
        if isinstance(fr, Mapping) and fr.get('not_run') is not None:
            lines.append(f'{label}: fragility not run: {fr["not_run"]}')
            continue
        eff = _get(fr, 'effect')
        if _finite_float(_get(eff, 'estimate')) is None:
            continue
        side = _ci_side(eff)
        if read[c['model']]['readable']:
            sides.append(side)
        else:
            unreadable.add(c['model'])
        rho = _get(fr, 'rho_feature')
        if _finite_float(_get(rho, 'estimate')) is not None:
            rhos.append(_get(rho, 'estimate'))
        lines.append(
            f'{label}: S(Q1)-S(Q5) = {_fmt_ci(eff)} ({_ci_side_text(side)}); rho(firing rate, '
            f'survival) = {_fmt_ci(rho)}'
        )
    n_above, n_below = sides.count('above'), sides.count('below')
    total = len(sides)
    status = 'holds' if n_above > total / 2 else 'fails' if n_below > total / 2 else 'not resolved'
    rng = f'; rho(firing, survival) from {min(rhos):.3f} to {max(rhos):.3f}' if rhos else ''
    head = (
        f'the CI of S(Q1) - S(Q5) lies above 0 in {n_above} and below 0 in {n_below} of {total} pruned '
        f'conditions (holds when above 0 in most, fails when below 0 in most){rng}'
    )
    return _claim_if_readable('rare_survive_better', lines, sides, status, head, read, unreadable)


def _claim_transfer(results: Mapping[str, Any], viable_fraction: float) -> dict[str, Any]:
    dense = _dense(results)
    lines, ok, total = [], 0, 0
    for c in _pruned(results):
        if c['method'] != 'wanda' or c['sparsity'] > 0.5 + 1e-9:
            continue
        rec = _finite_float(_get(c, 'transfer', 'ce_recovered'))
        ref = _finite_float(_get(dense.get(c['model']), 'transfer', 'ce_recovered'))
        if rec is None or ref is None or ref <= 0:
            continue
        total += 1
        rec_low = _finite_float(_get(c, 'transfer', 'ce_recovered_ci', 0))
        used = rec if rec_low is None else rec_low
        rel = used / ref
        ok += rel >= viable_fraction
        tr = c.get('transfer') or {}
        rec_txt = (
            _fmt(rec)
            if rec_low is None
            else f'{_fmt_ci(_ci_list(rec, tr.get("ce_recovered_ci")))}, lower bound {_fmt(used)}'
        )
        lines.append(
            f'{c["model"]} Wanda {_pct(c["sparsity"])}: CE recovered {rec_txt} '
            f'= {rel:.2f} of dense {_fmt(ref)}; FVU '
            f'{_fmt_ci(_ci_list(tr.get("fvu"), tr.get("fvu_ci")))}, '
            f'L0 {_fmt(tr.get("l0"), 1)}, Jaccard '
            f'{_fmt_ci(_ci_list(tr.get("jaccard"), tr.get("jaccard_ci")))}'
        )
    status = 'not tested' if total == 0 else 'holds' if ok == total else 'fails'
    head = (
        f"the fixed dictionary keeps >= {viable_fraction:.0%} of its dense CE recovered (the CI's lower "
        f'bound where there is a CI) at {ok} of {total} Wanda sparsities up to 50%'
        if total
        else 'not tested: no Wanda condition up to 50% with transfer measures'
    )
    return _claim(
        'transfer_viable_wanda_50',
        'A fixed (dense or pretrained) SAE stays viable on Wanda-pruned models up to 50% sparsity',
        status,
        head,
        lines,
        'Gemma Scope viable on Wanda-pruned Gemma up to 50%',
    )


def _signed_correlation(ca: Any) -> Any:
    """The signed survival-causal correlation of a causal record, None in results.json files that
    predate |effect| (their 'correlation' is the signed one)."""
    if not isinstance(ca, Mapping):
        return None
    return ca.get('correlation_signed', ca.get('signed'))


def _fmt_agreement(ag: Any) -> str:
    if isinstance(ag, Mapping):
        return _fmt_ci(ag)
    return _fmt(ag)


def _claim_causal(results: Mapping[str, Any], band: float) -> dict[str, Any]:
    read = _readability(results)
    lines, states, unreadable, measures = [], [], set(), set()
    for c in _pruned(results):
        ca = c.get('causal') or {}
        iv = ca.get('correlation')
        if _finite_float(_get(iv, 'estimate')) is None:
            continue
        lo, hi = _finite_float(_get(iv, 'low')), _finite_float(_get(iv, 'high'))
        if lo is None or hi is None:
            state = 'no CI'
        elif -band < lo and hi < band:
            state = 'inside'
        elif lo >= band or hi <= -band:
            state = 'outside'
        else:
            state = 'overlaps the band edge'
        if read[c['model']]['readable']:
            states.append(state)
        else:
            unreadable.add(c['model'])
        measures.add(str(ca.get('measure') or 'unknown'))
        target = (
            '|effect|'
            if _signed_correlation(ca) is not None
            else 'effect (signed; this results.json predates |effect|)'
        )
        live = (
            f'{ca.get("n_live")} live of {ca.get("n_features")} features'
            if ca.get('n_live') is not None
            else f'{ca.get("n_features")} features'
        )
        extra = f'; signed rho {_fmt_ci(_signed_correlation(ca))}' if _signed_correlation(ca) is not None else ''
        n_ag = ca.get('agreement_features')
        ag = (
            f'; attribution vs exact ablation agreement {_fmt_agreement(ca["agreement"])}'
            f'{f" over {n_ag} ablated features" if n_ag is not None else ""}'
            if ca.get('agreement') is not None
            else ''
        )
        lines.append(
            f'{c["model"]} {c["method"]} {_pct(c["sparsity"])}: Spearman(survival, {target}) = '
            f'{_fmt_ci(iv)} over {live}, {ca.get("measure") or "unknown"} effects (CI {state}){extra}{ag}'
        )
    status, n_in, n_out = _unanimous(states, 'inside', 'outside')
    target = (
        '|effect|'
        if all(_signed_correlation(c.get('causal')) is not None for c in _pruned(results) if c.get('causal'))
        else 'effect'
    )
    head = (
        f'the CI of rho(survival, {target}) lies inside the equivalence band (-{band:g}, {band:g}) in '
        f'{n_in} and wholly outside it in {n_out} of {len(states)} pruned conditions (holds only when '
        f'inside in every one; a CI that merely covers 0 is absence of evidence); measure: '
        f'{", ".join(sorted(measures))} effects'
    )
    return _claim_if_readable('survival_not_causal', lines, states, status, head, read, unreadable)


def summarize_claims(
    results: Mapping[str, Any], viable_fraction: float = 0.8, weak_rho: float = EQUIVALENCE_BAND
) -> list[dict[str, Any]]:
    """Checks the paper's four headline claims against this run's numbers; each claim gets a
    status ('holds', 'fails', 'not resolved', 'not readable', 'not tested') decided by its CIs,
    never by point estimates alone.

    Rules (thresholds are our reading; the paper gives none):
      wanda_beats_magnitude: holds when the CI of survival(Wanda) - survival(magnitude) (seed
        bootstrap, the dense seeds shared) is above 0 at every common sparsity; fails when it is
        below 0 at one; else not resolved.
      rare_survive_better: holds when the CI of S(Q1) - S(Q5) is above 0 in most pruned conditions;
        fails when below 0 in most; else not resolved.
      transfer_viable_wanda_50: holds when the fixed dictionary keeps >= `viable_fraction` of its
        dense CE loss recovered (the CI's lower bound where there is one) at every Wanda sparsity
        up to 50%.
      survival_not_causal: holds when the CI of rho(survival, |effect|) lies inside
        (-weak_rho, weak_rho) in every pruned condition; fails when wholly outside in one.
      The three claims built on survival are 'not readable' when the dense seed floor is below
      config analysis.min_seed_floor (default 0.2): the SAEs have not converged.
    """
    return [
        _claim_wanda(results),
        _claim_rare(results),
        _claim_transfer(results, viable_fraction),
        _claim_causal(results, weak_rho),
    ]


# --------------------------------------------------------------------------- figures

_COLORS = {'dense': 'black', 'magnitude': 'tab:red', 'wanda': 'tab:blue', 'sparsegpt': 'tab:green'}


def _series(results: Mapping[str, Any], getter) -> dict[tuple[str, str], tuple[list, list, list, list]]:
    """(model, method) -> (sparsities, values, lows, highs) with the dense point at sparsity 0."""
    dense = _dense(results)
    out: dict[tuple[str, str], tuple[list, list, list, list]] = {}
    for c in _pruned(results):
        key = (c['model'], c['method'])
        if key not in out:
            out[key] = ([], [], [], [])
            d = dense.get(c['model'])
            if d is not None and _finite_float(getter(d)[0]) is not None:
                for lst, v in zip(out[key], (0.0, *getter(d))):
                    lst.append(v)
        v, lo, hi = getter(c)
        if _finite_float(v) is None:
            continue
        for lst, x in zip(out[key], (c['sparsity'], v, lo, hi)):
            lst.append(x)
    return out


def _label(results: Mapping[str, Any], model: str, method: str) -> str:
    return method if len(results.get('models') or {}) <= 1 else f'{model} {method}'


def _errorbar(ax, xs, ys, los, his, **kw) -> None:
    ys = np.asarray(ys, dtype=float)
    lo = np.asarray([y if _finite_float(l) is None else l for y, l in zip(ys, los)], dtype=float)
    hi = np.asarray([y if _finite_float(h) is None else h for y, h in zip(ys, his)], dtype=float)
    ax.errorbar(xs, ys, yerr=np.stack([np.maximum(ys - lo, 0), np.maximum(hi - ys, 0)]), marker='o', capsize=3, **kw)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110, bbox_inches='tight', metadata={'Software': None})
    return atomic_write_bytes(path, buf.getvalue())


def _fig_survival(results, path: Path) -> Path:
    fig = Figure(figsize=(10, 4))
    ax = fig.add_subplot(1, 2, 1)
    iv = lambda c: (_get(c, 'survival', 'estimate'), _get(c, 'survival', 'low'), _get(c, 'survival', 'high'))
    for (model, method), (xs, ys, los, his) in _series(results, iv).items():
        _errorbar(ax, xs, ys, los, his, label=_label(results, model, method), color=_COLORS.get(method))
    dense = _dense(results)
    for model, d in dense.items():
        floor = _get(d, 'stability', 'shared')
        if _finite_float(_get(floor, 'estimate')) is None:
            continue
        ax.axhline(
            floor['estimate'],
            color='gray',
            ls='--',
            lw=1,
            label=f'seed floor ({model})' if len(dense) > 1 else 'seed floor',
        )
        if _finite_float(floor.get('low')) is not None and _finite_float(floor.get('high')) is not None:
            ax.axhspan(floor['low'], floor['high'], color='gray', alpha=0.15)
    tau = _get(results, 'config', 'analysis', 'tau')
    ax.set(
        xlabel='sparsity',
        ylabel=f'MNN feature survival (tau = {tau})',
        ylim=(-0.02, 1.02),
        title='Feature survival vs sparsity',
    )
    ax.legend(fontsize=8)
    # Threshold-free companion: how close the nearest pruned-model feature is, on average.
    ax2 = fig.add_subplot(1, 2, 2)
    get = lambda c: (_get(c, 'survival', 'mean_max_cos'), None, None)
    for (model, method), (xs, ys, _, _) in _series(results, get).items():
        ax2.plot(xs, ys, marker='o', label=_label(results, model, method), color=_COLORS.get(method))
    for model, d in dense.items():
        if _finite_float(_get(d, 'survival', 'mean_max_cos')) is not None:
            ax2.axhline(d['survival']['mean_max_cos'], color='gray', ls='--', lw=1, label='seed floor')
    ax2.set(
        xlabel='sparsity',
        ylabel='mean max cosine to the other SAE',
        ylim=(0, 1.02),
        title='Nearest-feature cosine vs sparsity',
    )
    if ax2.lines:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _fig_quintiles(results, path: Path) -> Path:
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    rows = [c for c in _pruned(results) if _get(c, 'fragility', 'per_quintile')]
    width = 0.8 / max(len(rows), 1)
    for i, c in enumerate(rows):
        per_q = np.asarray([np.nan if _finite_float(v) is None else v for v in c['fragility']['per_quintile']])
        xs = np.arange(1, per_q.size + 1) + (i - (len(rows) - 1) / 2) * width
        cis = c['fragility'].get('per_quintile_ci')
        yerr = None
        if cis:
            lo = np.asarray([np.nan if _finite_float(_get(ci, 0)) is None else ci[0] for ci in cis])
            hi = np.asarray([np.nan if _finite_float(_get(ci, 1)) is None else ci[1] for ci in cis])
            yerr = np.nan_to_num(np.stack([per_q - lo, hi - per_q]).clip(min=0))
        label = f'{_label(results, c["model"], c["method"])} {_pct(c["sparsity"])}'
        ax.bar(
            xs,
            np.nan_to_num(per_q),
            width=width,
            yerr=yerr,
            capsize=2,
            label=label,
            color=_COLORS.get(c['method']),
            alpha=0.35 + 0.6 * c['sparsity'],
        )
    n_q = max((len(c['fragility']['per_quintile']) for c in rows), default=5)
    ax.set_xticks(np.arange(1, n_q + 1), [f'Q{q}' for q in range(1, n_q + 1)])
    ax.set(
        xlabel='firing-rate quintile (Q1 rarest)',
        ylabel='survival',
        ylim=(0, 1.02),
        title='Survival by firing-rate quintile',
    )
    if rows:
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _fig_transfer(results, path: Path) -> Path:
    fig = Figure(figsize=(9, 6.5))
    metrics = (('fvu', 'FVU'), ('l0', 'L0'), ('jaccard', 'Jaccard vs dense'), ('ce_recovered', 'CE loss recovered'))
    for i, (key, name) in enumerate(metrics):
        ax = fig.add_subplot(2, 2, i + 1)
        get = lambda c, key=key: (_get(c, 'transfer', key), None, None)
        for (model, method), (xs, ys, _, _) in _series(results, get).items():
            ax.plot(xs, ys, marker='o', label=_label(results, model, method), color=_COLORS.get(method))
        ax.set(xlabel='sparsity', ylabel=name)
        if i == 0:
            ax.legend(fontsize=8)
    dictionary = {_get(c, 'transfer', 'dictionary') for c in results['conditions']} - {None}
    fig.suptitle(f'Fixed dictionary on pruned models ({", ".join(sorted(dictionary)) or "n/a"})')
    fig.tight_layout()
    return _save(fig, path)


def _fig_ppl(results, path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for (model, method), (xs, ys, _, _) in _series(results, lambda c: (c.get('ppl'), None, None)).items():
        ax.plot(xs, ys, marker='o', label=_label(results, model, method), color=_COLORS.get(method))
    ax.set_yscale('log')
    ax.set(xlabel='sparsity', ylabel='perplexity (log scale)', title='Perplexity vs sparsity')
    ax.legend(fontsize=8)
    return _save(fig, path)


def _fig_causal(results, path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    absolute = False
    for c in _pruned(results):
        x, y = _get(c, 'causal', 'max_cos'), _get(c, 'causal', 'effect')
        if not x or not y:
            continue
        rho = _get(c, 'causal', 'correlation', 'estimate')
        y = np.asarray(y, float)
        if _signed_correlation(c['causal']) is not None:  # the correlation is with |effect|: plot what it correlates
            y, absolute = np.abs(y), True
        ax.scatter(
            np.asarray(x, float),
            y,
            s=10,
            alpha=0.6,
            color=_COLORS.get(c['method']),
            marker='o' if c['sparsity'] <= 0.35 else '^',
            label=f'{_label(results, c["model"], c["method"])} {_pct(c["sparsity"])} (rho {_fmt(rho, 2)})',
        )
    ax.set(
        xlabel='survival (max cosine to the pruned SAEs)',
        ylabel='|causal effect| (|delta loss|)' if absolute else 'causal effect (delta loss)',
        title='Survival vs causal importance' if absolute else 'Survival vs causal effect',
    )
    if ax.collections:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _cond_label(results, c) -> str:
    if c['method'] == 'dense':
        return 'dense' if len(results.get('models') or {}) <= 1 else f'{c["model"]} dense'
    return f'{_label(results, c["model"], c["method"])} {_pct(c["sparsity"])}'


def _fig_seed_agreement(results, path: Path) -> Path:
    """Seed-pair shared fraction vs training tokens per condition (is training converging?), and
    the training FVU curve beside it."""
    fig = Figure(figsize=(10, 4))
    ax = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    styles = ('-', '--', ':', '-.')
    for i, c in enumerate(results['conditions']):
        cv = c.get('convergence') or {}
        pts = [
            (t, v)
            for t, v in zip(cv.get('tokens') or [], cv.get('shared') or [])
            if _finite_float(t) is not None and _finite_float(v) is not None
        ]
        color = _COLORS.get(c['method'])
        alpha = 1.0 if c['method'] == 'dense' else 0.4 + 0.6 * c['sparsity']
        ls = styles[i % len(styles)] if c['method'] != 'dense' else '-'
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker='o',
                color=color,
                alpha=alpha,
                ls=ls,
                lw=2.2 if c['method'] == 'dense' else 1.2,
                label=_cond_label(results, c),
            )
        curve = cv.get('curve') or {}
        bs = _finite_float(cv.get('batch_size')) or 1.0
        cur = [
            (float(st) * bs, v)
            for st, v in zip(curve.get('step') or [], curve.get('fvu') or [])
            if _finite_float(st) is not None and _finite_float(v) is not None
        ]
        if cur:
            ax2.plot(
                [p[0] for p in cur], [p[1] for p in cur], color=color, alpha=alpha, ls=ls, label=_cond_label(results, c)
            )
    t = _min_seed_floor(results)
    ax.axhline(t, color='gray', ls='--', lw=1, label=f'min_seed_floor {t:g}')
    ax.set(
        xlabel='training tokens seen',
        ylabel='seed-pair shared fraction at tau',
        ylim=(-0.02, 1.02),
        title='Seed agreement during SAE training',
    )
    if not any(c.get('convergence') for c in results['conditions']):
        ax.text(0.5, 0.5, 'no convergence data in results.json', ha='center', va='center', transform=ax.transAxes)
    ax.legend(fontsize=7)
    ax2.set(xlabel='training tokens seen', ylabel='training FVU (mean over seeds)', title='Training FVU')
    if ax2.lines:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def write_figures(results: Mapping[str, Any], workdir: str | os.PathLike) -> dict[str, Path]:
    """Writes figures/<name>.png for every figure."""
    fdir = Path(workdir) / 'figures'
    makers = {
        'survival_vs_sparsity': _fig_survival,
        'survival_by_quintile': _fig_quintiles,
        'transfer_vs_sparsity': _fig_transfer,
        'ppl_vs_sparsity': _fig_ppl,
        'survival_vs_causal': _fig_causal,
        'seed_agreement': _fig_seed_agreement,
    }
    return {name: fn(results, fdir / f'{name}.png') for name, fn in makers.items()}


# --------------------------------------------------------------------------- report.md


def _md_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    if not rows:
        return '_no rows_\n'
    head = '| ' + ' | '.join(name for _, name in columns) + ' |'
    sep = '|' + '|'.join('---' for _ in columns) + '|'
    body = []
    for r in rows:
        cells = []
        for key, _ in columns:
            v = r.get(key)
            if key == 'sparsity':
                cells.append(_pct(v))
            elif isinstance(v, float) or v is None:
                cells.append(_fmt(v))
            else:
                cells.append(str(v).replace('|', '\\|'))  # a '|' in a cell would split it
        body.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join([head, sep, *body]) + '\n'


def _section(title: str, figures: Sequence[tuple[str, str]]) -> list[str]:
    """A report section's heading and its figures [(alt text, file in figures/)], as markdown lines."""
    return [f'## {title}', '', *(f'![{alt}](figures/{name})' for alt, name in figures), '']


def _ci_cols(rows, est, name, with_range=False):
    """Adds a formatted 'estimate [low, high]' column `name` from the columns est, est_low, est_high;
    with_range adds the pair range (est_min, est_max) when n_seeds is below FEW_SEEDS."""
    for r in rows:
        iv = {'estimate': r.get(est), 'low': r.get(f'{est}_low'), 'high': r.get(f'{est}_high')}
        if with_range:
            iv.update(min=r.get(f'{est}_min'), max=r.get(f'{est}_max'), n_seeds=r.get('n_seeds'))
        r[name] = _fmt_ci(iv)
    return rows


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f'{h}h {m:02d}m {s:02d}s' if h else f'{m}m {s:02d}s'


def _readability_lines(results: Mapping[str, Any]) -> list[str]:
    """The readability rule, printed prominently when a model's dense seed floor is too low."""
    lines = []
    tau = _get(results, 'config', 'analysis', 'tau')
    for model, r in _readability(results).items():
        who = f' ({model})' if len(_readability(results)) > 1 else ''
        if r['plateau'] is not None:
            mid, last, p_mid, p_last = r['plateau']
            trend = 'still rising' if last - mid > 0.02 else 'falling' if mid - last > 0.02 else 'flat'
            plateau = (
                f'Seed agreement at {p_mid}% of the training steps {_fmt(mid)} vs {p_last}% {_fmt(last)} ({trend}).'
            )
        else:
            plateau = 'No convergence snapshots in results.json to tell whether training has plateaued.'
        if r['floor'] is None:
            lines += [
                '',
                f'> **Readability{who}:** no dense seed floor in results.json; survival claims are '
                f'judged on their CIs alone.',
            ]
        elif not r['readable']:
            lines += [
                '',
                f'> **NOT READABLE{who}: SAEs not converged.** The dense seed floor (the fraction '
                f'of features that SAEs trained with different seeds on the same dense activations '
                f'share at tau = {tau}) is {_fmt_ci(r["floor_iv"])} < threshold {_fmt(r["threshold"])} '
                f'(analysis.min_seed_floor). Survival, fragility and the survival-causal correlation '
                f'then measure training noise, so their claims are marked **not readable** whatever '
                f'the numbers say. {plateau} Perplexity and the fixed-dictionary (transfer) numbers do '
                f'not depend on it. Train longer (sae.epochs, sae.n_tokens) or use a smaller dictionary '
                f'(sae.expansion, sae.k) until the seed floor passes the threshold; '
                f'bench/convergence.py measures what a budget reaches (docs/method.md, "Convergence").',
            ]
        else:
            lines += [
                '',
                f'- readability{who}: dense seed floor {_fmt_ci(r["floor_iv"])} >= threshold '
                f'{_fmt(r["threshold"])} (analysis.min_seed_floor). {plateau}',
            ]
    return lines


def report_markdown(results: Mapping[str, Any], timings: Mapping[str, Any] | None = None) -> str:
    """The text of report.md (tables, embedded figures, the claims with their numbers)."""
    t = tables(results)
    claims = summarize_claims(results)  # recomputed: the same numbers with this version's wording
    cfg = results.get('config') or {}
    prov = results.get('provenance') or {}
    dev = prov.get('device') or {}
    ver = prov.get('versions') or {}
    lines = [f'# prunesae_jax study: {results.get("name", "")}', '']
    for model, m in (results.get('models') or {}).items():
        lines.append(
            f'- **{model}** ({m.get("family")}, {m.get("num_layers")} layers, d_model '
            f'{m.get("d_model")}): SAEs on resid_post of layer {m.get("layer")}, '
            f'{m.get("n_latents")} latents; dense perplexity {_fmt(m.get("dense_ppl"), 2)}'
        )
    sae = cfg.get('sae') or {}
    ana = cfg.get('analysis') or {}
    conv = next((c.get('convergence') for c in results.get('conditions') or [] if c.get('convergence')), None)
    steps = (
        f', {sae.get("epochs")} epochs = {conv["n_steps"]} steps of {conv["batch_size"]}'
        if conv and conv.get('n_steps')
        else ''
    )
    lines.append(
        f'- {sae.get("n_seeds")} seeds of {sae.get("expansion")}x {sae.get("architecture")} '
        f'SAEs (k = {sae.get("k")}) on {sae.get("n_tokens")} unique tokens per condition{steps}; '
        f'{ana.get("pairing", "distinct")} inits per condition; MNN tau = {ana.get("tau")}; '
        f'{ana.get("n_bootstrap")} bootstrap resamples (over seeds for seed-pair measures), '
        f'{ana.get("ci")} CIs'
    )
    lines.append(
        f'- device: {dev.get("platform")} ({dev.get("device_kind")}, '
        f'{dev.get("device_count")} device(s), {dev.get("cpu_count")} CPU cores); jax '
        f'{ver.get("jax")}, flax {ver.get("flax")}; git {prov.get("git_revision")}'
    )
    if timings and _finite_float(timings.get('total_s')) is not None:
        lines.append(f'- wall time: {_duration(timings["total_s"])}')
    lines += _readability_lines(results)
    lines += [
        '',
        '## Headline claims',
        '',
        f'Each claim is decided by its confidence intervals: holds / fails / not resolved (the CI '
        f'does not decide) / not readable (dense seed floor below '
        f'{_fmt(_min_seed_floor(results))}) / not tested.',
        '',
    ]
    for c in claims:
        lines += [
            f'### {c["claim"]}: **{c.get("status", "not tested")}**',
            '',
            c['evidence'],
            '',
            f'_Paper:_ {c["paper"]}.',
            '',
        ]

    lines += _section(
        'Conditions',
        [('survival vs sparsity', 'survival_vs_sparsity.png'), ('perplexity vs sparsity', 'ppl_vs_sparsity.png')],
    )
    rows = _ci_cols([dict(r) for r in t['conditions']], 'survival', 'survival_ci')
    rows = _ci_cols(rows, 'seed_floor', 'seed_floor_ci')
    rows = _ci_cols(rows, 'ppl', 'ppl_ci')
    lines.append(
        _md_table(
            rows,
            [
                ('model', 'model'),
                ('method', 'method'),
                ('sparsity', 'sparsity'),
                ('achieved_sparsity', 'achieved'),
                ('ppl_ci', 'PPL'),
                ('delta_log_ppl', 'Δ log PPL'),
                ('survival_ci', 'survival [CI]'),
                ('seed_floor_ci', 'seed floor [CI]'),
                ('mean_max_cos', 'mean max cos'),
            ],
        )
    )
    lines += ['## SAE convergence', '', '![seed agreement](figures/seed_agreement.png)', '']
    if t['convergence']:
        pct_cols = [
            (k, f'shared @{k[len("shared_") : -len("pct")]}%')
            for k in t['convergence'][0]
            if k.startswith('shared_') and k.endswith('pct')
        ]
        rows = [dict(r) for r in t['convergence']]
        for r in rows:
            r['epochs_txt'] = _fmt(r.get('epochs'), 2)
        lines += [
            'Seed-pair shared fraction at tau at each training snapshot (mean over pairs), distance '
            'from initialisation (mean cosine of final vs initial decoder rows; near 1 = the decoder '
            'barely moved) and final training quality (means over seeds).',
            '',
        ]
        lines.append(
            _md_table(
                rows,
                [
                    ('method', 'method'),
                    ('sparsity', 'sparsity'),
                    ('n_steps', 'steps'),
                    ('tokens_seen', 'tokens seen'),
                    ('epochs_txt', 'epochs'),
                    *pct_cols,
                    ('init_cos', 'init cos'),
                    ('fvu', 'FVU'),
                    ('l0', 'L0'),
                    ('dead_frac', 'dead'),
                ],
            )
        )
    else:
        lines += ['_no convergence records in results.json_', '']
    lines += ['## Seed stability (RQ1)', '']
    rows = _ci_cols([dict(r) for r in t['seed_stability']], 'shared', 'shared_ci', with_range=True)
    rows = _ci_cols(rows, 'divergence', 'div_ci')
    lines.append(
        _md_table(
            rows,
            [
                ('method', 'method'),
                ('sparsity', 'sparsity'),
                ('shared_ci', 'shared fraction [CI]'),
                ('div_ci', 'divergence [CI]'),
                ('n_pairs', 'seed pairs'),
                ('kendalls_w', "Kendall's W (taus)"),
            ],
        )
    )
    w = _get(results, 'tau_agreement', 'kendalls_w')
    if _finite_float(w) is not None:
        lines += [
            f'Agreement of the condition rankings across tau = '
            f'{", ".join(str(x) for x in results["tau_agreement"].get("taus", []))}: '
            f"Kendall's W = {_fmt(w)}.",
            '',
        ]
    lines += ['## Survival (RQ2)', '']
    rows = _ci_cols([dict(r) for r in t['survival']], 'survival', 'surv_ci', with_range=True)
    cols = [('method', 'method'), ('sparsity', 'sparsity'), ('surv_ci', 'survival [CI]'), ('n_pairs', 'seed pairs')]
    if rows and 'pairing' in rows[0]:
        cols.append(('pairing', 'pairing'))
    if rows and 'null' in rows[0]:
        rows = _ci_cols(rows, 'null', 'null_ci')
        cols.append(('null_ci', 'init-only null [CI]'))
    cols += [
        (k, k.replace('survival_tau_', 'tau ')) for k in (rows[0] if rows else {}) if k.startswith('survival_tau_')
    ]
    lines.append(_md_table(rows, cols))
    if rows and 'null' in rows[0]:
        lines += [
            'The init-only null is the survival that the shared initialisations alone give (SAEs '
            'that start from the same init but see no training signal in common); survival is '
            'informative only above it.',
            '',
        ]
    lines += _section('Fragility by firing-rate quintile (RQ4)', [('survival by quintile', 'survival_by_quintile.png')])
    rows = _ci_cols([dict(r) for r in t['fragility'] if not r.get('not_run')], 'effect', 'eff')
    rows = _ci_cols(rows, 'rho_feature', 'rho')
    lines.append(
        _md_table(
            rows,
            [
                ('method', 'method'),
                ('sparsity', 'sparsity'),
                ('s_q1', 'S(Q1)'),
                ('s_q5', 'S(Q5)'),
                ('eff', 'S(Q1)-S(Q5) [CI]'),
                ('rho_quintile', 'rho (quintiles)'),
                ('rho', 'rho (features) [CI]'),
            ],
        )
    )
    for r in t['fragility']:
        if r.get('not_run'):
            lines.append(f'- {r["method"]} {_pct(r["sparsity"])}: fragility not run: {r["not_run"]}')
    if any(r.get('not_run') for r in t['fragility']):
        lines.append('')
    lines += _section('Transfer of a fixed dictionary (RQ3)', [('transfer vs sparsity', 'transfer_vs_sparsity.png')])
    rows = [dict(r) for r in t['transfer']]
    for k in ('fvu', 'jaccard', 'ce_recovered'):
        rows = _ci_cols(rows, k, f'{k}_txt')
    lines.append(
        _md_table(
            rows,
            [
                ('method', 'method'),
                ('sparsity', 'sparsity'),
                ('fvu_txt', 'FVU'),
                ('l0', 'L0'),
                ('jaccard_txt', 'Jaccard'),
                ('ce_clean', 'CE clean'),
                ('ce_spliced', 'CE spliced'),
                ('ce_recovered_txt', 'CE recovered'),
            ],
        )
    )
    lines += _section('Survival vs causal importance (RQ5)', [('survival vs causal effect', 'survival_vs_causal.png')])
    rows = _ci_cols([dict(r) for r in t['causal']], 'rho', 'rho_ci')
    rows = _ci_cols(rows, 'rho_signed', 'rho_signed_ci')
    rows = _ci_cols(rows, 'agreement', 'agreement_ci')
    for r in rows:
        r['live'] = f'{r["n_live"]} of {r["n_features"]}' if r.get('n_live') is not None else f'{r.get("n_features")}'
        if r.get('agreement_features') is not None and _finite_float(r.get('agreement')) is not None:
            r['agreement_ci'] += f' ({r["agreement_features"]} ablated)'
        r['measure'] = r.get('measure') or 'n/a'
    lines.append(
        _md_table(
            rows,
            [
                ('method', 'method'),
                ('sparsity', 'sparsity'),
                ('measure', 'effects'),
                ('live', 'live features'),
                ('target', 'importance'),
                ('rho_ci', 'Spearman(survival, importance) [CI]'),
                ('rho_signed_ci', 'signed Spearman [CI]'),
                ('agreement_ci', 'attribution vs exact [CI]'),
            ],
        )
    )
    used = sorted({r['measure'] for r in rows})
    if rows:
        lines += [
            f'Importance is |effect| of zero-ablating a feature on the next-token loss, over the '
            f'features that fire on the causal tokens (a feature that never fires has an effect of '
            f'exactly 0 and says nothing). The claim used the {", ".join(used)} effects; '
            f'"attribution vs exact" is the Spearman agreement of the gradient x activation '
            f'attribution with exact ablation over the exactly ablated features.',
            '',
        ]
    lines += [
        '## Diagnostics vs Δ log PPL',
        '',
        'Spearman correlation of each diagnostic with Δ log PPL over the pruned conditions.',
        '',
    ]
    lines.append(
        _md_table(
            t['diagnostics'],
            [
                ('diagnostic', 'diagnostic'),
                ('spearman_vs_delta_log_ppl', 'this run'),
                ('n_conditions', 'conditions'),
                ('paper', 'paper'),
            ],
        )
    )
    lines += ['Tables as CSV: `tables/`. Every number: `results.json`. Wall-clock times per stage: `timings.json`.', '']
    return '\n'.join(lines)


def write_report(
    results: Mapping[str, Any], workdir: str | os.PathLike, timings: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Writes tables/*.csv, figures/*.png and report.md; returns {name: path}."""
    if results.get('schema') != SCHEMA:
        raise InputError(f'results schema {results.get("schema")!r} is not {SCHEMA!r}')
    paths: dict[str, Path] = {}
    paths.update({f'tables/{k}': v for k, v in write_tables(results, workdir).items()})
    paths.update({f'figures/{k}': v for k, v in write_figures(results, workdir).items()})
    paths['report'] = atomic_write_text(Path(workdir) / 'report.md', report_markdown(results, timings))
    return paths
