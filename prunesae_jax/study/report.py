"""Tables, figures and report.md from a study's results.

`write_report(results, workdir)` reads nothing but the results dict, so it can
be re-run on any results.json (`python -c "from prunesae_jax.study import report;
report.write_report(report.load_results('w/results.json'), 'w')"`).

The results.json schema ('prunesae_jax.results/1'); an Interval is
{"estimate": float, "low": float, "high": float}; a number may be null when a
measure does not apply (e.g. transfer of the dense condition onto itself is
still reported, fragility of the dense condition is null):

  schema       'prunesae_jax.results/1'
  name         the config's name
  config       the validated config (plain JSON)
  provenance   {versions: {package: version}, git_revision, device: {platform, device_kind, ...}}
  models       {model: {family, num_layers, d_model, layer, n_latents, dense_ppl}}
  conditions   list, the dense condition of each model first, then method x sparsity in config order:
    model, layer, method ('dense' | 'magnitude' | 'wanda' | 'sparsegpt'), sparsity (target, 0 for dense),
    achieved_sparsity (fraction of prunable weights that are zero), achieved_by_kind
    ({attention, mlp}: the same per kind of matrix), group (null for dense),
    ppl, delta_log_ppl (log ppl - log dense ppl),
    stability   RQ1 within this condition's seeds at tau:
                {shared: Interval, divergence: Interval, n_pairs, kendalls_w,
                 by_tau: {"0.6": mean shared fraction, ...}}
    survival    RQ2 dense SAEs vs this condition's SAEs (dense vs dense = across seeds):
                {estimate, low, high, fractions: [per seed pair], by_tau: {"0.6": float, ...},
                 mean_max_cos: mean over dense features and seed pairs of the max cosine to the other
                 dictionary (threshold-free)}
    fragility   RQ4 (null for dense): {per_quintile: [n_q] survival Q1 (rarest) .. Q5,
                per_quintile_ci: [[low, high]] * n_q or null, effect: Interval S(Q1) - S(Q5),
                rho_quintile: float, rho_feature: Interval Spearman(firing rate, survival)}
    transfer    RQ3 the fixed dictionary on this condition's activations:
                {dictionary: 'dense' | repo/path, fvu, l0, jaccard (active sets vs the dense model, token
                by token), ce_clean, ce_spliced, ce_zero, ce_recovered, kl}
    causal      RQ5 (null for dense): {n_features, correlation: Interval Spearman(max cosine survival,
                causal effect), max_cos: [k], effect: [k]}
    sae         training quality per seed: {fvu: [S], l0: [S], dead_frac: [S]}
  tau_agreement  {taus: [...], kendalls_w: float}  agreement of the taus' rankings of the conditions
  claims       list of {id, claim, holds: true | false | null, evidence, paper} (from summarize_claims)

Outputs: tables/{conditions, perplexity, seed_stability, survival, survival_by_quintile, fragility,
transfer, causal, diagnostics}.csv, figures/{survival_vs_sparsity, survival_by_quintile,
transfer_vs_sparsity, ppl_vs_sparsity, survival_vs_causal}.png, report.md.
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
from prunesae_jax.study.workdir import atomic_write_bytes, atomic_write_text

__all__ = [
    'SCHEMA',
    'load_results',
    'tables',
    'summarize_claims',
    'write_tables',
    'write_figures',
    'write_report',
    'format_condition',
]

SCHEMA = 'prunesae_jax.results/1'
TABLES = ('conditions', 'perplexity', 'seed_stability', 'survival', 'survival_by_quintile',
          'fragility', 'transfer', 'causal', 'diagnostics')
FIGURES = ('survival_vs_sparsity', 'survival_by_quintile', 'transfer_vs_sparsity',
           'ppl_vs_sparsity', 'survival_vs_causal')

# Below this dense seed-pair shared fraction the report warns that survival is mostly noise.
LOW_SEED_FLOOR = 0.5
# The paper's Spearman correlations of each diagnostic with delta log PPL over 17 pruned conditions.
PAPER_DIAGNOSTICS = {'jaccard': -0.975, 'survival': -0.684, 'fvu': 0.556, 'fragility': -0.032}


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


def _num(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(x: Any, digits: int = 3) -> str:
    f = _num(x)
    if f is None:
        return 'n/a'
    if f != 0 and (abs(f) >= 1e4 or abs(f) < 10 ** -digits):
        return f'{f:.{digits}g}'
    return f'{f:.{digits}f}'


def _fmt_ci(iv: Any, digits: int = 3) -> str:
    """'0.794 [0.75, 0.83]' from an Interval dict."""
    est = _get(iv, 'estimate')
    lo, hi = _get(iv, 'low'), _get(iv, 'high')
    if _num(lo) is None or _num(hi) is None:
        return _fmt(est, digits)
    return f'{_fmt(est, digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]'


def _sfmt(x: float, digits: int = 3) -> str:
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
    label = 'dense' if cond['method'] == 'dense' else f"{cond['method']} {_pct(cond['sparsity'])}"
    parts = [f"{cond['model']} L{cond.get('layer')} {label}:",
             f"ppl {_fmt(cond.get('ppl'), 2)} (dlogppl {_fmt(cond.get('delta_log_ppl'))})",
             f"survival {_fmt_ci(cond.get('survival'))}",
             f"stability {_fmt(_get(cond, 'stability', 'shared', 'estimate'))}"]
    if cond.get('fragility'):
        parts.append(f"S(Q1)-S(Q5) {_fmt(_get(cond, 'fragility', 'effect', 'estimate'))}")
    if cond.get('transfer'):
        parts.append(f"transfer FVU {_fmt(_get(cond, 'transfer', 'fvu'))} "
                     f"CE rec {_fmt(_get(cond, 'transfer', 'ce_recovered'))}")
    if cond.get('causal'):
        parts.append(f"rho(surv, causal) {_fmt(_get(cond, 'causal', 'correlation', 'estimate'))}")
    return ' | '.join(parts)


def _dense(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c['model']: c for c in results['conditions'] if c['method'] == 'dense'}


def _pruned(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [c for c in results['conditions'] if c['method'] != 'dense']


def _key(c: Mapping[str, Any]) -> dict[str, Any]:
    return {'model': c['model'], 'method': c['method'], 'sparsity': c['sparsity']}


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    pairs = [(a, b) for a, b in zip(x, y) if _num(a) is not None and _num(b) is not None]
    if len(pairs) < 3:
        return None
    from prunesae_jax.analysis.stats import spearman  # pylint: disable=g-import-not-at-top
    return _num(spearman(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])))


# --------------------------------------------------------------------------- tables

def tables(results: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every CSV table as a list of rows (dicts with the same keys in the same order)."""
    dense = _dense(results)
    conds = results['conditions']
    taus = [str(t) for t in _get(results, 'config', 'analysis', 'taus') or []]
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES}

    for c in conds:
        floor = _get(dense.get(c['model']), 'stability', 'shared')
        out['conditions'].append({
            **_key(c), 'layer': c.get('layer'), 'achieved_sparsity': c.get('achieved_sparsity'),
            'ppl': c.get('ppl'), 'delta_log_ppl': c.get('delta_log_ppl'),
            'survival': _get(c, 'survival', 'estimate'), 'survival_low': _get(c, 'survival', 'low'),
            'survival_high': _get(c, 'survival', 'high'),
            'mean_max_cos': _get(c, 'survival', 'mean_max_cos'),
            'seed_floor': _get(floor, 'estimate'), 'seed_floor_low': _get(floor, 'low'),
            'seed_floor_high': _get(floor, 'high')})
        out['perplexity'].append({
            **_key(c), 'group': c.get('group'), 'achieved_sparsity': c.get('achieved_sparsity'),
            'achieved_attention': _get(c, 'achieved_by_kind', 'attention'),
            'achieved_mlp': _get(c, 'achieved_by_kind', 'mlp'),
            'ppl': c.get('ppl'), 'delta_log_ppl': c.get('delta_log_ppl')})
        st = c.get('stability') or {}
        out['seed_stability'].append({
            **_key(c), 'tau': _get(results, 'config', 'analysis', 'tau'),
            'shared': _get(st, 'shared', 'estimate'), 'shared_low': _get(st, 'shared', 'low'),
            'shared_high': _get(st, 'shared', 'high'),
            'divergence': _get(st, 'divergence', 'estimate'),
            'divergence_low': _get(st, 'divergence', 'low'),
            'divergence_high': _get(st, 'divergence', 'high'),
            'n_pairs': st.get('n_pairs'), 'kendalls_w': st.get('kendalls_w')})
        row = {**_key(c), 'survival': _get(c, 'survival', 'estimate'),
               'survival_low': _get(c, 'survival', 'low'), 'survival_high': _get(c, 'survival', 'high'),
               'n_pairs': len(_get(c, 'survival', 'fractions') or [])}
        for t in taus:
            row[f'survival_tau_{t}'] = _get(c, 'survival', 'by_tau', t)
        out['survival'].append(row)

        fr = c.get('fragility')
        if fr:
            per_q = fr.get('per_quintile') or []
            cis = fr.get('per_quintile_ci') or [None] * len(per_q)
            for q, (s, ci) in enumerate(zip(per_q, cis), start=1):
                out['survival_by_quintile'].append({
                    **_key(c), 'quintile': q, 'survival': s, 'low': _get(ci, 0), 'high': _get(ci, 1)})
            out['fragility'].append({
                **_key(c), 's_q1': _get(per_q, 0), 's_q5': _get(per_q, -1),
                'effect': _get(fr, 'effect', 'estimate'), 'effect_low': _get(fr, 'effect', 'low'),
                'effect_high': _get(fr, 'effect', 'high'), 'rho_quintile': fr.get('rho_quintile'),
                'rho_feature': _get(fr, 'rho_feature', 'estimate'),
                'rho_feature_low': _get(fr, 'rho_feature', 'low'),
                'rho_feature_high': _get(fr, 'rho_feature', 'high')})
        tr = c.get('transfer')
        if tr:
            out['transfer'].append({
                **_key(c), 'dictionary': tr.get('dictionary'),
                **{k: tr.get(k) for k in ('fvu', 'l0', 'jaccard', 'ce_clean', 'ce_spliced', 'ce_zero',
                                          'ce_recovered', 'kl')}})
        ca = c.get('causal')
        if ca:
            out['causal'].append({
                **_key(c), 'n_features': ca.get('n_features'),
                'rho': _get(ca, 'correlation', 'estimate'), 'rho_low': _get(ca, 'correlation', 'low'),
                'rho_high': _get(ca, 'correlation', 'high')})

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
        n = sum(_num(a) is not None and _num(b) is not None for a, b in zip(vals, dlp))
        out['diagnostics'].append({'diagnostic': name, 'spearman_vs_delta_log_ppl': _spearman(vals, dlp),
                                   'n_conditions': n, 'paper': PAPER_DIAGNOSTICS[name]})
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

def _bootstrap_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 2000,
                    ci: float = 0.95, seed: int = 0) -> tuple[float, float, float] | None:
    """mean(a) - mean(b) with a percentile bootstrap resampling a and b independently."""
    a = np.asarray([x for x in a if _num(x) is not None], dtype=np.float64)
    b = np.asarray([x for x in b if _num(x) is not None], dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return None
    rng = np.random.default_rng(seed)
    boots = (a[rng.integers(0, a.size, (n_boot, a.size))].mean(1)
             - b[rng.integers(0, b.size, (n_boot, b.size))].mean(1))
    alpha = (1 - ci) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    return float(a.mean() - b.mean()), float(lo), float(hi)


def _claim(cid: str, claim: str, holds: bool | None, head: str, lines: Sequence[str], paper: str) -> dict[str, Any]:
    """One claim dict: the headline `head` then one bullet per condition in `lines` as its evidence."""
    return {'id': cid, 'claim': claim, 'holds': holds,
            'evidence': head + ('.\n' + '\n'.join(f'- {ln}' for ln in lines) if lines else '.'),
            'paper': paper}


def _claim_wanda(results: Mapping[str, Any]) -> dict[str, Any]:
    by = {(c['model'], c['method'], round(c['sparsity'], 6)): c for c in _pruned(results)}
    lines, wins, total = [], 0, 0
    for (model, method, s), cw in sorted(by.items()):
        if method != 'wanda' or (model, 'magnitude', s) not in by:
            continue
        cm = by[(model, 'magnitude', s)]
        sw, sm = _get(cw, 'survival', 'estimate'), _get(cm, 'survival', 'estimate')
        if _num(sw) is None or _num(sm) is None:
            continue
        total += 1
        wins += sw > sm
        diff = _bootstrap_diff(_get(cw, 'survival', 'fractions') or [sw],
                               _get(cm, 'survival', 'fractions') or [sm])
        ratio = f'{sw / sm:.1f}x' if sm > 0 else 'inf'
        d = f'{_sfmt(diff[0])} [{_sfmt(diff[1])}, {_sfmt(diff[2])}]' if diff else 'n/a'
        lines.append(f'{model} {_pct(s)}: Wanda {_fmt_ci(cw["survival"])} vs magnitude '
                     f'{_fmt_ci(cm["survival"])}; difference {d}; ratio {ratio}')
    holds = None if total == 0 else wins == total
    head = (f'Wanda keeps more features than magnitude at {wins} of {total} sparsities'
            if total else 'not tested: needs both magnitude and Wanda at a common sparsity')
    return _claim('wanda_beats_magnitude', 'Wanda preserves feature structure better than magnitude pruning '
                  '(MNN survival at tau)', holds, head, lines,
                  'up to 3.7x; Gemma 2 2B at 30%: 0.794 Wanda vs 0.210 magnitude')


def _claim_rare(results: Mapping[str, Any]) -> dict[str, Any]:
    lines, above, total, rhos = [], 0, 0, []
    for c in _pruned(results):
        eff = _get(c, 'fragility', 'effect')
        if _num(_get(eff, 'estimate')) is None:
            continue
        total += 1
        lo = _num(_get(eff, 'low'))
        above += lo is not None and lo > 0
        rho = _get(c, 'fragility', 'rho_feature')
        if _num(_get(rho, 'estimate')) is not None:
            rhos.append(_get(rho, 'estimate'))
        lines.append(f'{c["model"]} {c["method"]} {_pct(c["sparsity"])}: S(Q1)-S(Q5) = '
                     f'{_fmt_ci(eff)}; rho(firing rate, survival) = {_fmt_ci(rho)}')
    holds = None if total == 0 else above > total / 2
    rng = f'; rho(firing, survival) from {min(rhos):.3f} to {max(rhos):.3f}' if rhos else ''
    head = (f'S(Q1) - S(Q5) > 0 with its CI above 0 in {above} of {total} pruned conditions{rng}'
            if total else 'not tested: no pruned condition has fragility measures')
    return _claim('rare_survive_better', 'Rare features (firing-rate Q1) survive pruning better than frequent '
                  'ones (Q5)', holds, head, lines,
                  'v1: rho = -1.0 in 11 of 17 conditions; revision: rho between -0.540 and 0.062')


def _claim_transfer(results: Mapping[str, Any], viable_fraction: float) -> dict[str, Any]:
    dense = _dense(results)
    lines, ok, total = [], 0, 0
    for c in _pruned(results):
        if c['method'] != 'wanda' or c['sparsity'] > 0.5 + 1e-9:
            continue
        rec = _num(_get(c, 'transfer', 'ce_recovered'))
        ref = _num(_get(dense.get(c['model']), 'transfer', 'ce_recovered'))
        if rec is None or ref is None or ref <= 0:
            continue
        total += 1
        rel = rec / ref
        ok += rel >= viable_fraction
        lines.append(f'{c["model"]} Wanda {_pct(c["sparsity"])}: CE recovered {_fmt(rec)} '
                     f'({rel:.2f} of dense {_fmt(ref)}), FVU {_fmt(_get(c, "transfer", "fvu"))}, '
                     f'L0 {_fmt(_get(c, "transfer", "l0"), 1)}, Jaccard {_fmt(_get(c, "transfer", "jaccard"))}')
    holds = None if total == 0 else ok == total
    head = (f'the fixed dictionary keeps >= {viable_fraction:.0%} of its dense CE recovered at {ok} of '
            f'{total} Wanda sparsities up to 50%' if total else
            'not tested: no Wanda condition up to 50% with transfer measures')
    return _claim('transfer_viable_wanda_50', 'A fixed (dense or pretrained) SAE stays viable on Wanda-pruned '
                  'models up to 50% sparsity', holds, head, lines, 'Gemma Scope viable on Wanda-pruned Gemma up to 50%')


def _claim_causal(results: Mapping[str, Any], weak: float) -> dict[str, Any]:
    lines, weak_n, total = [], 0, 0
    for c in _pruned(results):
        iv = _get(c, 'causal', 'correlation')
        est = _num(_get(iv, 'estimate'))
        if est is None:
            continue
        total += 1
        lo, hi = _num(_get(iv, 'low')), _num(_get(iv, 'high'))
        covers_zero = lo is not None and hi is not None and lo <= 0 <= hi
        weak_n += covers_zero or abs(est) < weak
        lines.append(f'{c["model"]} {c["method"]} {_pct(c["sparsity"])}: Spearman(survival, causal '
                     f'effect) = {_fmt_ci(iv)} over {_get(c, "causal", "n_features")} features')
    holds = None if total == 0 else weak_n > total / 2
    head = (f'the correlation is weak (|rho| < {weak} or its CI covers 0) in {weak_n} of {total} pruned '
            'conditions' if total else 'not tested: no pruned condition has causal measures')
    return _claim('survival_not_causal', 'Geometric survival does not predict a feature\'s causal effect on '
                  'the loss', holds, head, lines, 'geometric survival does not predict causal importance')


def summarize_claims(results: Mapping[str, Any], viable_fraction: float = 0.8,
                     weak_rho: float = 0.3) -> list[dict[str, Any]]:
    """Checks the paper's four headline claims against this run's numbers.

    Thresholds (our reading; the paper gives none): transfer is 'viable' when the fixed dictionary
    keeps >= `viable_fraction` of its dense-model CE loss recovered; a survival-causal correlation is
    'weak' when |rho| < `weak_rho` or its CI covers 0.
    """
    return [_claim_wanda(results), _claim_rare(results),
            _claim_transfer(results, viable_fraction), _claim_causal(results, weak_rho)]


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
            if d is not None and _num(getter(d)[0]) is not None:
                for lst, v in zip(out[key], (0.0, *getter(d))):
                    lst.append(v)
        v, lo, hi = getter(c)
        if _num(v) is None:
            continue
        for lst, x in zip(out[key], (c['sparsity'], v, lo, hi)):
            lst.append(x)
    return out


def _label(results: Mapping[str, Any], model: str, method: str) -> str:
    return method if len(results.get('models') or {}) <= 1 else f'{model} {method}'


def _errorbar(ax, xs, ys, los, his, **kw) -> None:
    ys = np.asarray(ys, dtype=float)
    lo = np.asarray([y if _num(l) is None else l for y, l in zip(ys, los)], dtype=float)
    hi = np.asarray([y if _num(h) is None else h for y, h in zip(ys, his)], dtype=float)
    ax.errorbar(xs, ys, yerr=np.stack([np.maximum(ys - lo, 0), np.maximum(hi - ys, 0)]),
                marker='o', capsize=3, **kw)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110, bbox_inches='tight', metadata={'Software': None})
    return atomic_write_bytes(path, buf.getvalue())


def _fig_survival(results, path: Path) -> Path:
    fig = Figure(figsize=(10, 4))
    ax = fig.add_subplot(1, 2, 1)
    iv = lambda c: (_get(c, 'survival', 'estimate'), _get(c, 'survival', 'low'),
                    _get(c, 'survival', 'high'))
    for (model, method), (xs, ys, los, his) in _series(results, iv).items():
        _errorbar(ax, xs, ys, los, his, label=_label(results, model, method),
                  color=_COLORS.get(method))
    dense = _dense(results)
    for model, d in dense.items():
        floor = _get(d, 'stability', 'shared')
        if _num(_get(floor, 'estimate')) is None:
            continue
        ax.axhline(floor['estimate'], color='gray', ls='--', lw=1,
                   label=f'seed floor ({model})' if len(dense) > 1 else 'seed floor')
        if _num(floor.get('low')) is not None and _num(floor.get('high')) is not None:
            ax.axhspan(floor['low'], floor['high'], color='gray', alpha=0.15)
    tau = _get(results, 'config', 'analysis', 'tau')
    ax.set(xlabel='sparsity', ylabel=f'MNN feature survival (tau = {tau})', ylim=(-0.02, 1.02),
           title='Feature survival vs sparsity')
    ax.legend(fontsize=8)
    # Threshold-free companion: how close the nearest pruned-model feature is, on average.
    ax2 = fig.add_subplot(1, 2, 2)
    get = lambda c: (_get(c, 'survival', 'mean_max_cos'), None, None)
    for (model, method), (xs, ys, _, _) in _series(results, get).items():
        ax2.plot(xs, ys, marker='o', label=_label(results, model, method), color=_COLORS.get(method))
    for model, d in dense.items():
        if _num(_get(d, 'survival', 'mean_max_cos')) is not None:
            ax2.axhline(d['survival']['mean_max_cos'], color='gray', ls='--', lw=1, label='seed floor')
    ax2.set(xlabel='sparsity', ylabel='mean max cosine to the other SAE', ylim=(0, 1.02),
            title='Nearest-feature cosine vs sparsity')
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
        per_q = np.asarray([np.nan if _num(v) is None else v for v in c['fragility']['per_quintile']])
        xs = np.arange(1, per_q.size + 1) + (i - (len(rows) - 1) / 2) * width
        cis = c['fragility'].get('per_quintile_ci')
        yerr = None
        if cis:
            lo = np.asarray([np.nan if _num(_get(ci, 0)) is None else ci[0] for ci in cis])
            hi = np.asarray([np.nan if _num(_get(ci, 1)) is None else ci[1] for ci in cis])
            yerr = np.nan_to_num(np.stack([per_q - lo, hi - per_q]).clip(min=0))
        label = f'{_label(results, c["model"], c["method"])} {_pct(c["sparsity"])}'
        ax.bar(xs, np.nan_to_num(per_q), width=width, yerr=yerr, capsize=2, label=label,
               color=_COLORS.get(c['method']), alpha=0.35 + 0.6 * c['sparsity'])
    n_q = max((len(c['fragility']['per_quintile']) for c in rows), default=5)
    ax.set_xticks(np.arange(1, n_q + 1), [f'Q{q}' for q in range(1, n_q + 1)])
    ax.set(xlabel='firing-rate quintile (Q1 rarest)', ylabel='survival', ylim=(0, 1.02),
           title='Survival by firing-rate quintile')
    if rows:
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _fig_transfer(results, path: Path) -> Path:
    fig = Figure(figsize=(9, 6.5))
    metrics = (('fvu', 'FVU'), ('l0', 'L0'), ('jaccard', 'Jaccard vs dense'),
               ('ce_recovered', 'CE loss recovered'))
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
    for c in _pruned(results):
        x, y = _get(c, 'causal', 'max_cos'), _get(c, 'causal', 'effect')
        if not x or not y:
            continue
        rho = _get(c, 'causal', 'correlation', 'estimate')
        ax.scatter(np.asarray(x, float), np.asarray(y, float), s=10, alpha=0.6,
                   color=_COLORS.get(c['method']), marker='o' if c['sparsity'] <= 0.35 else '^',
                   label=f'{_label(results, c["model"], c["method"])} {_pct(c["sparsity"])} '
                         f'(rho {_fmt(rho, 2)})')
    ax.set(xlabel='survival (max cosine to the pruned SAEs)', ylabel='causal effect (delta loss)',
           title='Survival vs causal effect')
    if ax.collections:
        ax.legend(fontsize=7)
    return _save(fig, path)


def write_figures(results: Mapping[str, Any], workdir: str | os.PathLike) -> dict[str, Path]:
    """Writes figures/<name>.png for every figure."""
    fdir = Path(workdir) / 'figures'
    makers = {'survival_vs_sparsity': _fig_survival, 'survival_by_quintile': _fig_quintiles,
              'transfer_vs_sparsity': _fig_transfer, 'ppl_vs_sparsity': _fig_ppl,
              'survival_vs_causal': _fig_causal}
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
                cells.append(str(v))
        body.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join([head, sep, *body]) + '\n'


def _ci_cols(rows, est, lo, hi, name):
    for r in rows:
        r[name] = _fmt_ci({'estimate': r.get(est), 'low': r.get(lo), 'high': r.get(hi)})
    return rows


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f'{h}h {m:02d}m {s:02d}s' if h else f'{m}m {s:02d}s'


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
        lines.append(f'- **{model}** ({m.get("family")}, {m.get("num_layers")} layers, d_model '
                     f'{m.get("d_model")}): SAEs on resid_post of layer {m.get("layer")}, '
                     f'{m.get("n_latents")} latents; dense perplexity {_fmt(m.get("dense_ppl"), 2)}')
    sae = cfg.get('sae') or {}
    ana = cfg.get('analysis') or {}
    lines.append(f'- {sae.get("n_seeds")} seeds of {sae.get("expansion")}x {sae.get("architecture")} '
                 f'SAEs (k = {sae.get("k")}) on {sae.get("n_tokens")} tokens per condition; MNN '
                 f'tau = {ana.get("tau")}; {ana.get("n_bootstrap")} bootstrap resamples, '
                 f'{ana.get("ci")} CIs')
    lines.append(f'- device: {dev.get("platform")} ({dev.get("device_kind")}, '
                 f'{dev.get("device_count")} device(s), {dev.get("cpu_count")} CPU cores); jax '
                 f'{ver.get("jax")}, flax {ver.get("flax")}; git {prov.get("git_revision")}')
    if timings and _num(timings.get('total_s')) is not None:
        lines.append(f'- wall time: {_duration(timings["total_s"])}')
    for model, d in _dense(results).items():
        floor = _num(_get(d, 'stability', 'shared', 'estimate'))
        if floor is not None and floor < LOW_SEED_FLOOR:
            lines += ['', f'> **Caution ({model}):** the seed floor is {_fmt(floor)}: SAEs trained with '
                      f'different seeds on the same dense activations share only that fraction of '
                      f'features at tau = {ana.get("tau")}, so the SAEs are far from converged and the '
                      f'survival and fragility numbers below are dominated by training noise. The '
                      f'perplexity and fixed-dictionary (transfer) numbers do not depend on it. Train '
                      f'on more tokens (sae.n_tokens, sae.epochs) for survival to mean what it means '
                      f'in the paper (seed floor about 0.97).']
    lines += ['', '## Headline claims', '']
    for c in claims:
        verdict = {True: 'holds', False: 'does not hold', None: 'not tested'}[c['holds']]
        lines += [f'### {c["claim"]}: **{verdict}**', '', c['evidence'], '',
                  f'_Paper:_ {c["paper"]}.', '']

    lines += ['## Conditions', '', '![survival vs sparsity](figures/survival_vs_sparsity.png)',
              '![perplexity vs sparsity](figures/ppl_vs_sparsity.png)', '']
    rows = _ci_cols(_ci_cols([dict(r) for r in t['conditions']], 'survival', 'survival_low',
                             'survival_high', 'survival_ci'),
                    'seed_floor', 'seed_floor_low', 'seed_floor_high', 'seed_floor_ci')
    lines.append(_md_table(rows, [('model', 'model'), ('method', 'method'), ('sparsity', 'sparsity'),
                                  ('achieved_sparsity', 'achieved'), ('ppl', 'PPL'),
                                  ('delta_log_ppl', 'Δ log PPL'), ('survival_ci', 'survival [CI]'),
                                  ('seed_floor_ci', 'seed floor [CI]'),
                                  ('mean_max_cos', 'mean max cos')]))
    lines += ['## Seed stability (RQ1)', '']
    rows = _ci_cols([dict(r) for r in t['seed_stability']], 'shared', 'shared_low', 'shared_high',
                    'shared_ci')
    rows = _ci_cols(rows, 'divergence', 'divergence_low', 'divergence_high', 'div_ci')
    lines.append(_md_table(rows, [('method', 'method'), ('sparsity', 'sparsity'),
                                  ('shared_ci', 'shared fraction [CI]'), ('div_ci', 'divergence [CI]'),
                                  ('n_pairs', 'seed pairs'), ('kendalls_w', "Kendall's W (taus)")]))
    w = _get(results, 'tau_agreement', 'kendalls_w')
    if _num(w) is not None:
        lines += [f"Agreement of the condition rankings across tau = "
                  f"{', '.join(str(x) for x in results['tau_agreement'].get('taus', []))}: "
                  f"Kendall's W = {_fmt(w)}.", '']
    lines += ['## Survival by tau (RQ2)', '']
    cols = [('method', 'method'), ('sparsity', 'sparsity')] + [
        (k, k.replace('survival_tau_', 'tau ')) for k in (t['survival'][0] if t['survival'] else {})
        if k.startswith('survival_tau_')]
    lines.append(_md_table(t['survival'], cols))
    lines += ['## Fragility by firing-rate quintile (RQ4)', '',
              '![survival by quintile](figures/survival_by_quintile.png)', '']
    rows = _ci_cols([dict(r) for r in t['fragility']], 'effect', 'effect_low', 'effect_high', 'eff')
    rows = _ci_cols(rows, 'rho_feature', 'rho_feature_low', 'rho_feature_high', 'rho')
    lines.append(_md_table(rows, [('method', 'method'), ('sparsity', 'sparsity'), ('s_q1', 'S(Q1)'),
                                  ('s_q5', 'S(Q5)'), ('eff', 'S(Q1)-S(Q5) [CI]'),
                                  ('rho_quintile', 'rho (quintiles)'),
                                  ('rho', 'rho (features) [CI]')]))
    lines += ['## Transfer of a fixed dictionary (RQ3)', '',
              '![transfer vs sparsity](figures/transfer_vs_sparsity.png)', '']
    lines.append(_md_table(t['transfer'], [('method', 'method'), ('sparsity', 'sparsity'),
                                           ('fvu', 'FVU'), ('l0', 'L0'), ('jaccard', 'Jaccard'),
                                           ('ce_clean', 'CE clean'), ('ce_spliced', 'CE spliced'),
                                           ('ce_recovered', 'CE recovered')]))
    lines += ['## Survival vs causal effect (RQ5)', '',
              '![survival vs causal effect](figures/survival_vs_causal.png)', '']
    rows = _ci_cols([dict(r) for r in t['causal']], 'rho', 'rho_low', 'rho_high', 'rho_ci')
    lines.append(_md_table(rows, [('method', 'method'), ('sparsity', 'sparsity'),
                                  ('n_features', 'features'), ('rho_ci', 'Spearman [CI]')]))
    lines += ['## Diagnostics vs Δ log PPL', '',
              'Spearman correlation of each diagnostic with Δ log PPL over the pruned conditions.', '']
    lines.append(_md_table(t['diagnostics'], [('diagnostic', 'diagnostic'),
                                              ('spearman_vs_delta_log_ppl', 'this run'),
                                              ('n_conditions', 'conditions'), ('paper', 'paper')]))
    lines += ['Tables as CSV: `tables/`. Every number: `results.json`. Wall-clock times per stage: '
              '`timings.json`.', '']
    return '\n'.join(lines)


def write_report(results: Mapping[str, Any], workdir: str | os.PathLike,
                 timings: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Writes tables/*.csv, figures/*.png and report.md; returns {name: path}."""
    if results.get('schema') != SCHEMA:
        raise InputError(f'results schema {results.get("schema")!r} is not {SCHEMA!r}')
    paths: dict[str, Path] = {}
    paths.update({f'tables/{k}': v for k, v in write_tables(results, workdir).items()})
    paths.update({f'figures/{k}': v for k, v in write_figures(results, workdir).items()})
    paths['report'] = atomic_write_text(Path(workdir) / 'report.md',
                                        report_markdown(results, timings))
    return paths
