"""report.py on a synthetic results dict: files exist, CSV numbers equal the dict, claims decide."""

import csv
import math

import numpy as np
import pytest

from prunesae_jax.study import report
from prunesae_jax.study.config import base_config
from prunesae_jax.study.workdir import to_jsonable

SPARSITIES = (0.3, 0.5)


def _iv(e, w=0.02):
    return {'estimate': e, 'low': e - w, 'high': e + w}


def _condition(method, s, rng):
    dense = method == 'dense'
    surv = {'dense': 0.95, 'magnitude': {0.3: 0.40, 0.5: 0.05}, 'wanda': {0.3: 0.85, 0.5: 0.60}}
    sv = surv['dense'] if dense else surv[method][s]
    ppl = {'dense': 20.0, 'magnitude': {0.3: 30.0, 0.5: 400.0}, 'wanda': {0.3: 22.0, 0.5: 35.0}}
    p = ppl['dense'] if dense else ppl[method][s]
    c = {
        'model': 'tiny:gemma3_text', 'layer': 1, 'method': method, 'sparsity': 0.0 if dense else s,
        'achieved_sparsity': 0.0 if dense else s + 0.001, 'group': None if dense else 'per_row',
        'ppl': p, 'delta_log_ppl': math.log(p / 20.0),
        'stability': {'shared': _iv(0.95), 'divergence': _iv(0.05), 'n_pairs': 3,
                      'kendalls_w': 0.9, 'by_tau': {'0.6': 0.97, '0.7': 0.95, '0.8': 0.9}},
        'survival': {**_iv(sv), 'fractions': [sv - 0.01, sv, sv + 0.01],
                     'by_tau': {'0.6': sv + 0.02, '0.7': sv, '0.8': sv - 0.02}},
        'fragility': None if dense else {
            'per_quintile': [sv + 0.2, sv + 0.1, sv, sv - 0.05, sv - 0.1],
            'per_quintile_ci': [[v - 0.03, v + 0.03] for v in (sv + 0.2, sv + 0.1, sv, sv - 0.05, sv - 0.1)],
            'effect': _iv(0.3, 0.05), 'rho_quintile': -1.0, 'rho_feature': _iv(-0.4, 0.1)},
        'transfer': {'dictionary': 'dense', 'fvu': 0.2 if dense else 0.2 + s, 'l0': 8.0,
                     'jaccard': 1.0 if dense else 1 - s, 'ce_clean': 3.0, 'ce_spliced': 3.2,
                     'ce_zero': 6.0, 'ce_recovered': 0.93 if dense else
                     (0.9 if method == 'wanda' else 0.3), 'kl': 0.1},
        'causal': None if dense else {
            'n_features': 16, 'correlation': _iv(0.05, 0.2),
            'max_cos': rng.uniform(0, 1, 16).tolist(), 'effect': rng.normal(0, 1, 16).tolist()},
        'sae': {'fvu': [0.2, 0.21], 'l0': [8.0, 8.0], 'dead_frac': [0.0, 0.01]},
    }
    return c


def synthetic_results():
    rng = np.random.default_rng(0)
    config = base_config()
    config.model = 'tiny:gemma3_text'
    conds = [_condition('dense', 0.0, rng)] + [
        _condition(m, s, rng) for m in ('magnitude', 'wanda') for s in SPARSITIES]
    res = {
        'schema': report.SCHEMA, 'name': 'synthetic', 'config': to_jsonable(config),
        'provenance': {'versions': {'jax': 'x', 'flax': 'y'}, 'git_revision': 'unknown',
                       'device': {'platform': 'cpu', 'device_kind': 'cpu', 'device_count': 1}},
        'models': {'tiny:gemma3_text': {'family': 'gemma3_text', 'num_layers': 4, 'd_model': 64,
                                        'layer': 1, 'n_latents': 512, 'dense_ppl': 20.0}},
        'conditions': conds,
        'tau_agreement': {'taus': [0.6, 0.7, 0.8], 'kendalls_w': 0.97},
    }
    res['claims'] = report.summarize_claims(res)
    return res


def _read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_write_report_files_and_values(tmp_path):
    res = synthetic_results()
    paths = report.write_report(res, tmp_path, timings={'total_s': 75.0})
    for name in report.TABLES:
        assert (tmp_path / 'tables' / f'{name}.csv').is_file()
    for name in report.FIGURES:
        p = tmp_path / 'figures' / f'{name}.png'
        assert p.is_file() and p.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and p.stat().st_size > 5000
    assert paths['report'] == tmp_path / 'report.md'

    rows = _read_csv(tmp_path / 'tables' / 'conditions.csv')
    assert len(rows) == 5
    for row, c in zip(rows, res['conditions']):
        assert row['method'] == c['method']
        assert float(row['sparsity']) == pytest.approx(c['sparsity'])
        assert float(row['ppl']) == pytest.approx(c['ppl'], rel=1e-5)
        assert float(row['delta_log_ppl']) == pytest.approx(c['delta_log_ppl'], rel=1e-5, abs=1e-9)
        assert float(row['survival']) == pytest.approx(c['survival']['estimate'], rel=1e-5)
        assert float(row['survival_low']) == pytest.approx(c['survival']['low'], rel=1e-5)
        assert float(row['seed_floor']) == pytest.approx(0.95)

    q = _read_csv(tmp_path / 'tables' / 'survival_by_quintile.csv')
    assert len(q) == 4 * 5
    wanda30 = [r for r in q if r['method'] == 'wanda' and float(r['sparsity']) == 0.3]
    assert [float(r['survival']) for r in wanda30] == pytest.approx([1.05, 0.95, 0.85, 0.80, 0.75])
    assert [int(r['quintile']) for r in wanda30] == [1, 2, 3, 4, 5]

    tr = _read_csv(tmp_path / 'tables' / 'transfer.csv')
    assert [float(r['fvu']) for r in tr] == pytest.approx([0.2, 0.5, 0.7, 0.5, 0.7])
    assert [float(r['ce_recovered']) for r in tr] == pytest.approx([0.93, 0.3, 0.3, 0.9, 0.9])

    ca = _read_csv(tmp_path / 'tables' / 'causal.csv')
    assert len(ca) == 4 and all(float(r['rho']) == pytest.approx(0.05) for r in ca)

    surv = _read_csv(tmp_path / 'tables' / 'survival.csv')
    assert float(surv[1]['survival_tau_0.8']) == pytest.approx(0.38)

    diag = {r['diagnostic']: r for r in _read_csv(tmp_path / 'tables' / 'diagnostics.csv')}
    # Ranks over (mag 30, mag 50, wanda 30, wanda 50): delta log PPL 2,4,1,3; survival 2,1,4,3;
    # sum d^2 = 18, rho = 1 - 6 * 18 / (4 * 15) = -0.8.
    assert float(diag['survival']['spearman_vs_delta_log_ppl']) == pytest.approx(-0.8)
    assert int(diag['jaccard']['n_conditions']) == 4

    md = (tmp_path / 'report.md').read_text()
    for name in report.FIGURES:
        assert f'(figures/{name}.png)' in md
    assert 'wall time: 1m 15s' in md
    assert '0.850 [0.830, 0.870]' in md  # wanda 30% survival with its CI


def test_claims_verdicts():
    res = synthetic_results()
    claims = {c['id']: c for c in res['claims']}
    assert claims['wanda_beats_magnitude']['holds'] is True
    assert 'at 2 of 2 sparsities' in claims['wanda_beats_magnitude']['evidence']
    assert '+0.450' in claims['wanda_beats_magnitude']['evidence']  # 0.85 - 0.40 at 30%
    assert claims['rare_survive_better']['holds'] is True
    assert claims['transfer_viable_wanda_50']['holds'] is True  # 0.9 / 0.93 >= 0.8
    assert claims['survival_not_causal']['holds'] is True  # CI [-0.15, 0.25] covers 0

    # Flip the evidence: magnitude wins at 50%, transfer collapses, survival predicts effect.
    for c in res['conditions']:
        if c['method'] == 'magnitude' and c['sparsity'] == 0.5:
            c['survival'] = {**_iv(0.9), 'fractions': [0.9, 0.9, 0.9]}
        if c['method'] == 'wanda' and c['sparsity'] == 0.5:
            c['transfer']['ce_recovered'] = 0.5
        if c['causal']:
            c['causal']['correlation'] = _iv(0.8, 0.05)
    claims = {c['id']: c for c in report.summarize_claims(res)}
    assert claims['wanda_beats_magnitude']['holds'] is False
    assert claims['transfer_viable_wanda_50']['holds'] is False
    assert claims['survival_not_causal']['holds'] is False


def test_claims_not_tested_without_data():
    res = synthetic_results()
    res['conditions'] = [c for c in res['conditions'] if c['method'] in ('dense', 'magnitude')]
    claims = {c['id']: c for c in report.summarize_claims(res)}
    assert claims['wanda_beats_magnitude']['holds'] is None
    assert claims['transfer_viable_wanda_50']['holds'] is None


def test_write_report_rejects_other_schema(tmp_path):
    with pytest.raises(ValueError, match='schema'):
        report.write_report({'schema': 'other'}, tmp_path)
