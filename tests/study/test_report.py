"""report.py on a synthetic results dict: files exist, CSV numbers equal the dict, claims decide."""

import csv
import math

import numpy as np
import pytest

from prunesae_jax.io import to_jsonable
from prunesae_jax.study import report
from prunesae_jax.study.config import base_config

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
        'model': 'tiny:gemma3_text',
        'layer': 1,
        'method': method,
        'sparsity': 0.0 if dense else s,
        'achieved_sparsity': 0.0 if dense else s + 0.001,
        'group': None if dense else 'per_row',
        'ppl': p,
        'delta_log_ppl': math.log(p / 20.0),
        'stability': {
            'shared': _iv(0.95),
            'divergence': _iv(0.05),
            'n_pairs': 3,
            'kendalls_w': 0.9,
            'by_tau': {'0.6': 0.97, '0.7': 0.95, '0.8': 0.9},
        },
        'survival': {
            **_iv(sv),
            'fractions': [sv - 0.01, sv, sv + 0.01],
            'by_tau': {'0.6': sv + 0.02, '0.7': sv, '0.8': sv - 0.02},
        },
        'fragility': None
        if dense
        else {
            'per_quintile': [sv + 0.2, sv + 0.1, sv, sv - 0.05, sv - 0.1],
            'per_quintile_ci': [[v - 0.03, v + 0.03] for v in (sv + 0.2, sv + 0.1, sv, sv - 0.05, sv - 0.1)],
            'effect': _iv(0.3, 0.05),
            'rho_quintile': -1.0,
            'rho_feature': _iv(-0.4, 0.1),
        },
        'transfer': {
            'dictionary': 'dense',
            'fvu': 0.2 if dense else 0.2 + s,
            'l0': 8.0,
            'jaccard': 1.0 if dense else 1 - s,
            'ce_clean': 3.0,
            'ce_spliced': 3.2,
            'ce_zero': 6.0,
            'ce_recovered': 0.93 if dense else (0.9 if method == 'wanda' else 0.3),
            'kl': 0.1,
        },
        'causal': None
        if dense
        else {
            'n_features': 16,
            'correlation': _iv(0.05, 0.2),
            'max_cos': rng.uniform(0, 1, 16).tolist(),
            'effect': rng.normal(0, 1, 16).tolist(),
        },
        'sae': {'fvu': [0.2, 0.21], 'l0': [8.0, 8.0], 'dead_frac': [0.0, 0.01]},
    }
    return c


def synthetic_results():
    rng = np.random.default_rng(0)
    config = base_config()
    config.model = 'tiny:gemma3_text'
    conds = [_condition('dense', 0.0, rng)] + [
        _condition(m, s, rng) for m in ('magnitude', 'wanda') for s in SPARSITIES
    ]
    res = {
        'schema': report.SCHEMA,
        'name': 'synthetic',
        'config': to_jsonable(config),
        'provenance': {
            'versions': {'jax': 'x', 'flax': 'y'},
            'git_revision': 'unknown',
            'device': {'platform': 'cpu', 'device_kind': 'cpu', 'device_count': 1},
        },
        'models': {
            'tiny:gemma3_text': {
                'family': 'gemma3_text',
                'num_layers': 4,
                'd_model': 64,
                'layer': 1,
                'n_latents': 512,
                'dense_ppl': 20.0,
            }
        },
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


# --------------------------------------------------------------------------- the schema with CIs,
# convergence records and the readability rule (results.json fields the pipeline writes)

GRID = [(i, j) for i in range(3) for j in range(3)]


def _grid(base, per_dense=(0.0, 0.0, 0.0), per_pruned=(0.0, 0.0, 0.0)):
    """Survival fractions of the 3 x 3 (dense seed, pruned seed) grid, row-major."""
    return [base + per_dense[i] + per_pruned[j] for i, j in GRID]


def _convergence(shared, n_steps=400, batch=64, unique=12800):
    steps = [n_steps // 4, n_steps // 2, n_steps]
    return {
        'n_steps': n_steps,
        'batch_size': batch,
        'train_tokens': unique,
        'steps': steps,
        'tokens': [s * batch for s in steps],
        'shared': list(shared),
        'init_cos': [0.9, 0.92, 0.94],
        'fvu': [0.3, 0.32, 0.34],
        'l0': [16.0, 16.0, 16.0],
        'dead_frac': [0.1, 0.2, 0.3],
        'curve': {
            'step': [0, 100, 200, 300, 400],
            'fvu': [1.0, 0.6, 0.45, 0.38, 0.32],
            'l0': [16.0] * 5,
            'dead_frac': [0.0, 0.1, 0.2, 0.2, 0.2],
            'aux_loss': [0.1, 0.05, 0.04, 0.03, 0.03],
        },
    }


def new_results(floor=0.95, min_seed_floor=None):
    """synthetic_results() with every optional field of the current schema filled in."""
    res = synthetic_results()
    if min_seed_floor is not None:
        res['config']['analysis']['min_seed_floor'] = min_seed_floor
    else:
        res['config']['analysis'].pop('min_seed_floor', None)
    for c in res['conditions']:
        sv = c['survival']['estimate']
        c['stability']['shared'].update(min=0.9, max=0.99, n_seeds=3)
        c['ppl_ci'] = [c['ppl'] * 0.98, c['ppl'] * 1.02]
        c['convergence'] = _convergence([0.6, 0.85, 0.9] if c['method'] != 'dense' else [0.7, 0.93, 0.95])
        if c['method'] == 'dense':
            c['stability']['shared'].update(
                estimate=floor, low=floor - 0.02, high=floor + 0.02, min=floor - 0.05, max=floor + 0.04
            )
            c['convergence']['shared'][-1] = floor
            continue
        c['survival'].update(
            fractions=_grid(sv, (0.01, -0.01, 0.0)),
            pairs=[list(p) for p in GRID],
            pairing='distinct',
            min=sv - 0.01,
            max=sv + 0.01,
            n_seeds=3,
        )
        c['transfer'].update(fvu_ci=[0.1, 0.9], jaccard_ci=[0.4, 0.6], ce_recovered_ci=[0.88, 0.92])
        c['causal'].update(
            measure='exact',
            n_live=12,
            correlation_signed=_iv(-0.05, 0.2),
            agreement={'estimate': 0.83, 'low': 0.7, 'high': 0.9},
            agreement_features=8,
        )
    return res


def _claims(res):
    return {c['id']: c for c in report.summarize_claims(res)}


def test_wanda_claim_follows_the_seed_bootstrap_difference_ci():
    # Wanda a hair above magnitude on average, but below it for one dense seed: the point
    # estimate says "Wanda wins" and the CI of the difference does not (SmolLM2's case).
    res = new_results()
    for c in res['conditions']:
        if c['method'] == 'magnitude':
            c['survival']['fractions'] = _grid(0.3)
        if c['method'] == 'wanda':
            c['survival']['fractions'] = _grid(0.3, (0.003, -0.002, 0.0005))
            c['survival']['estimate'] = float(np.mean(c['survival']['fractions']))
        if c['method'] == 'magnitude':
            c['survival']['estimate'] = 0.3
    cl = _claims(res)['wanda_beats_magnitude']
    assert cl['status'] == 'not resolved' and cl['holds'] is None
    assert 'dense seeds resampled jointly' in cl['evidence']
    # The printed difference is the seed-bootstrap one (estimate and per-dense-seed range).
    assert '+0.0005 [' in cl['evidence'] and 'per dense seed -0.002..+0.003, 3 seeds' in cl['evidence']
    assert 'CI contains 0' in cl['evidence']

    # Clearly below zero at one sparsity -> fails.
    for c in res['conditions']:
        if c['method'] == 'wanda' and c['sparsity'] == 0.5:
            c['survival']['fractions'] = _grid(0.2, (0.01, -0.01, 0.0))
            c['survival']['estimate'] = 0.2
    assert _claims(res)['wanda_beats_magnitude']['status'] == 'fails'
    assert _claims(res)['wanda_beats_magnitude']['holds'] is False

    # Above zero everywhere -> holds, and the report prints the status.
    cl = _claims(new_results())['wanda_beats_magnitude']
    assert cl['status'] == 'holds' and cl['holds'] is True
    assert '**holds**' in report.report_markdown(new_results())


def test_wanda_claim_when_both_survivals_are_zero():
    res = new_results()
    for c in res['conditions']:
        if c['method'] in ('wanda', 'magnitude') and c['sparsity'] == 0.5:
            c['survival'].update(estimate=0.0, low=0.0, high=0.0, fractions=_grid(0.0), min=0.0, max=0.0)
    cl = _claims(res)['wanda_beats_magnitude']
    assert 'no ratio: both survivals are 0' in cl['evidence'] and 'ratio inf' not in cl['evidence']
    assert cl['status'] == 'not resolved'


def test_low_dense_seed_floor_makes_survival_claims_not_readable(tmp_path):
    res = new_results(floor=0.15)
    cl = _claims(res)
    for cid in ('wanda_beats_magnitude', 'rare_survive_better', 'survival_not_causal'):
        assert cl[cid]['status'] == 'not readable' and cl[cid]['holds'] is None, cid
        assert 'SAEs not converged: dense seed floor 0.150 < threshold 0.200' in cl[cid]['evidence']
    assert '+0.450' in cl['wanda_beats_magnitude']['evidence']  # the numbers are still printed
    assert cl['transfer_viable_wanda_50']['status'] == 'holds'  # transfer does not use survival
    md = report.report_markdown(res)
    assert 'NOT READABLE: SAEs not converged.' in md
    assert '0.150 [0.130, 0.170] (pairs 0.100..0.190, 3 seeds) < threshold 0.200' in md
    # Plateau evidence from the dense convergence snapshots (50 % vs 100 % of the steps).
    assert 'at 50% of the training steps 0.930 vs 100% 0.150' in md
    assert md.count(': **not readable**\n') == 3
    # The threshold comes from the config when it is there.
    assert _claims(new_results(floor=0.15, min_seed_floor=0.1))['wanda_beats_magnitude']['status'] == 'holds'


def test_rare_claim_needs_its_ci_and_prints_not_run_reasons():
    res = new_results()
    pruned = [c for c in res['conditions'] if c['method'] != 'dense']
    for c in pruned[:3]:
        c['fragility']['effect'] = _iv(0.05, 0.1)  # straddles 0
    cl = _claims(res)['rare_survive_better']
    assert cl['status'] == 'not resolved' and cl['holds'] is None
    for c in pruned[:3]:
        c['fragility']['effect'] = _iv(-0.2, 0.05)
    assert _claims(res)['rare_survive_better']['status'] == 'fails'
    pruned[0]['fragility'] = {'not_run': 'fewer than 5 features fire'}
    cl = _claims(res)['rare_survive_better']
    assert 'fragility not run: fewer than 5 features fire' in cl['evidence']
    assert 'in 2 and below 0 in 2 of 3' not in cl['evidence'] and 'of 3 pruned conditions' in cl['evidence']
    md = report.report_markdown(res)
    assert 'magnitude 30%: fragility not run: fewer than 5 features fire' in md


def test_causal_claim_needs_the_ci_inside_the_equivalence_band():
    res = new_results()
    assert _claims(res)['survival_not_causal']['status'] == 'holds'  # [-0.15, 0.25] inside (-0.3, 0.3)
    # A CI that covers 0 but reaches past the band is absence of evidence, not evidence.
    for c in res['conditions']:
        if c['causal']:
            c['causal']['correlation'] = _iv(0.2, 0.3)
    cl = _claims(res)['survival_not_causal']
    assert cl['status'] == 'not resolved' and cl['holds'] is None
    assert 'exact effects' in cl['evidence']
    assert 'agreement 0.830 [0.700, 0.900] over 8 ablated features' in cl['evidence']
    assert '12 live of 16 features' in cl['evidence'] and 'signed rho -0.050' in cl['evidence']
    res['conditions'][1]['causal']['correlation'] = _iv(0.6, 0.1)
    assert _claims(res)['survival_not_causal']['status'] == 'fails'


def test_transfer_claim_uses_the_lower_bound_of_its_ci():
    res = new_results()
    assert _claims(res)['transfer_viable_wanda_50']['status'] == 'holds'  # 0.88 / 0.93 >= 0.8
    for c in res['conditions']:
        if c['method'] == 'wanda' and c['sparsity'] == 0.5:
            c['transfer']['ce_recovered_ci'] = [0.6, 0.95]  # estimate 0.9 still, lower bound 0.6
    cl = _claims(res)['transfer_viable_wanda_50']
    assert cl['status'] == 'fails' and cl['holds'] is False
    assert 'lower bound 0.600 = 0.65 of dense 0.930' in cl['evidence']


def test_convergence_table_figure_and_new_columns(tmp_path):
    res = new_results()
    report.write_report(res, tmp_path)
    conv = _read_csv(tmp_path / 'tables' / 'convergence.csv')
    assert len(conv) == 5
    dense = conv[0]
    assert dense['method'] == 'dense' and int(dense['n_steps']) == 400
    assert int(dense['tokens_seen']) == 400 * 64 and float(dense['epochs']) == pytest.approx(2.0)
    assert [float(dense[f'shared_{p}pct']) for p in (25, 50, 100)] == pytest.approx([0.7, 0.93, 0.95])
    assert float(dense['init_cos']) == pytest.approx(0.92)
    assert float(dense['dead_frac']) == pytest.approx(0.2)
    png = tmp_path / 'figures' / 'seed_agreement.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 5000

    md = (tmp_path / 'report.md').read_text()
    assert '## SAE convergence' in md and '(figures/seed_agreement.png)' in md
    assert '| shared @25% | shared @50% | shared @100% |' in md
    assert 'readability: dense seed floor 0.950 [0.930, 0.970] (pairs 0.900..0.990, 3 seeds) >= threshold' in md
    # Few seeds: the pair range beside the CI (seed stability and survival).
    assert '0.950 [0.930, 0.970] (pairs 0.900..0.990, 3 seeds)' in md
    assert '0.850 [0.830, 0.870] (pairs 0.840..0.860, 3 seeds)' in md
    # Transfer and perplexity CIs, causal agreement and the measure that fed the claim.
    assert '0.900 [0.880, 0.920]' in md and '0.700 [0.400, 0.600]' in md
    assert '22.000 [21.560, 22.440]' in md
    assert '0.830 [0.700, 0.900] (8 ablated)' in md and 'The claim used the exact effects' in md
    tr = _read_csv(tmp_path / 'tables' / 'transfer.csv')
    assert float(tr[1]['ce_recovered_low']) == pytest.approx(0.88)
    ca = _read_csv(tmp_path / 'tables' / 'causal.csv')
    assert ca[0]['target'] == '|effect|' and int(ca[0]['n_live']) == 12
    assert float(ca[0]['agreement']) == pytest.approx(0.83)

    # Survival pairing and the init-only null of a 'shared' pairing.
    for c in res['conditions'][1:]:
        c['survival'].update(
            pairing='shared',
            null=_iv(0.1, 0.01),
            pairs=[[s, s] for s in range(3)],
            fractions=[c['survival']['estimate']] * 3,
        )
    report.write_report(res, tmp_path)
    surv = _read_csv(tmp_path / 'tables' / 'survival.csv')
    assert surv[1]['pairing'] == 'shared' and float(surv[1]['null']) == pytest.approx(0.1)
    md = (tmp_path / 'report.md').read_text()
    assert '| init-only null [CI] |' in md and '0.100 [0.090, 0.110]' in md
    assert 'matched seeds resampled' in _claims(res)['wanda_beats_magnitude']['evidence']


def test_report_is_a_pure_function_of_results(tmp_path):
    res = new_results(floor=0.15)
    report.write_report(res, tmp_path / 'a')
    report.write_report(to_jsonable(res), tmp_path / 'b')
    for rel in (
        ['report.md'] + [f'figures/{f}.png' for f in report.FIGURES] + [f'tables/{t}.csv' for t in report.TABLES]
    ):
        assert (tmp_path / 'a' / rel).read_bytes() == (tmp_path / 'b' / rel).read_bytes(), rel
