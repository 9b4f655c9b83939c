"""Smoke tests of the bench/ scripts on tiny random models: they run end to end and report sane numbers."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'bench')


def _run(args, tmp_path, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    out = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _pos(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_gpu_tiny_writes_json_and_section(tmp_path):
    md = tmp_path / 'B.md'
    md.write_text('# Benchmarks\n\n## Other\n\nkept\n')
    _run([os.path.join(BENCH, 'gpu.py'), '--tiny', f'--md={md}'], tmp_path, {'OUT': str(tmp_path)})
    res = json.loads((tmp_path / 'bench_gpu.json').read_text())
    assert res['errors'] == [] and res['skipped'] == []
    assert res['device']['device_kind'] and res['versions']['jax']
    assert [m['dtype'] for m in res['matmul']] == ['float32', 'bfloat16']
    assert all(_pos(m['tflops']) and _pos(m['step_s']) for m in res['matmul'])
    assert [r['S'] for r in res['sae']] == [1, 2]
    for r in res['sae']:
        assert _pos(r['tokens_x_seeds_per_s']) and _pos(r['useful_tflops']) and _pos(r['frac_matmul_fp32'])
        assert r['tokens_x_seeds_per_s'] == pytest.approx(r['batch'] * r['S'] / r['step_s'])
    rows = res['forward']['rows']
    assert [r['kind'] for r in rows] == ['resid', 'nll']
    for r in rows:
        assert _pos(r['tokens_per_s']) and _pos(r['useful_tflops']) and _pos(r['gflop_per_token'])
    # the full forward adds the unembedding's 2*D*V FLOPs per token to the blocks'
    assert rows[1]['gflop_per_token'] > rows[0]['gflop_per_token']
    text = md.read_text()
    assert '## Other\n\nkept' in text and '## GPU (cpu)' in text
    assert (tmp_path / 'gpu_section.md').read_text().startswith('## GPU (cpu)')


def test_gpu_fallback_config_is_the_zoo_config():
    """The random-weight fallback must have Gemma 3 270M's exact config (checked when the zoo cache exists)."""
    sys.path.insert(0, BENCH)
    import gpu

    from prunesae_jax.models import zoo
    from prunesae_jax.models.config import DecoderConfig

    cfg = DecoderConfig.from_hf(gpu.GEMMA3_270M_HF)
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.head_dim) == (18, 640, 262144, 256)
    path = os.path.join(zoo.cache_dir('gemma-3-270m'), 'hf', 'config.json')
    if not os.path.isfile(path):
        pytest.skip(f'{path} is absent (zoo model not converted on this machine)')
    with open(path) as f:
        assert DecoderConfig.from_hf(json.load(f)) == cfg


def test_gpu_forward_flops_and_h200_section():
    sys.path.insert(0, BENCH)
    import gpu

    from prunesae_jax.testing import tiny_config

    cfg = tiny_config('gemma3_text')  # D 64, F 128, H 4, KV 2, hd 16, window 8, one global layer in 4
    T = 12
    lin = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k + v, o, gate + up + down
    ctx_local, ctx_full = sum(min(p + 1, 8) for p in range(T)) / T, (T + 1) / 2
    attn = 4 * 4 * 16 * (3 * ctx_local + ctx_full)
    flops, wbytes = gpu.forward_flops(cfg, T, unembed=False)
    assert flops == pytest.approx(2 * lin * 4 + attn) and wbytes == 2 * lin * 4
    flops_u, _ = gpu.forward_flops(cfg, T, unembed=True)
    assert flops_u - flops == pytest.approx(2 * 64 * 128)

    res = {
        'device': {'device_kind': 'NVIDIA H200', 'n_devices': 1, 'memory_gib': 130.0, 'backend': 'gpu'},
        'versions': {'jax': 'x'},
        'budget_s': 480,
        'elapsed_s': 100,
        'date': 'd',
        'matmul': [
            {'B': 4096, 'd': 640, 'n': 5120, 'dtype': 'bfloat16', 'step_s': 5e-5, 'tflops': 536.9, 'frac_peak': 0.543}
        ],
        'sae': [{'name': 'sae d640 S8', 'error': 'XlaRuntimeError: RESOURCE_EXHAUSTED'}],
        'forward': {'model': 'gemma-3-270m', 'source': 'RANDOM weights', 'rows': []},
        'skipped': ['sae d2304 S32'],
    }
    title, body = gpu.render(res)
    assert title == 'GPU (H200)' and gpu.peaks_for('NVIDIA H200')['hbm_bytes_per_s'] == 4.8e12
    assert '**NVIDIA H200**' in body and '| 537 | 0.543 |' in body
    assert 'RESOURCE_EXHAUSTED' in body and 'sae d2304 S32' in body and 'RANDOM weights' in body


def test_prune_quick_wanda_agrees_with_torch(tmp_path):
    pytest.importorskip('torch')
    out = tmp_path / 'p.json'
    _run(
        [os.path.join(BENCH, 'prune.py'), '--quick', '--skip_sparsegpt', '--skip_magnitude', f'--json={out}'], tmp_path
    )
    res = json.loads(out.read_text())
    for key in ('jax_wanda_s', 'jax_wanda_warm_s', 'torch_wanda_s', 'speedup', 'speedup_warm'):
        assert _pos(res[key]), key
    # same algorithm, same calibration tokens: the keep masks agree (up to float ties)
    assert res['mask_agreement'] >= 0.999
    assert len(res['mask_agreement_per_layer']) == 4 and min(res['mask_agreement_per_layer']) >= 0.999


def test_prune_mask_agreement_transposes_torch_layout():
    np = pytest.importorskip('numpy')
    sys.path.insert(0, BENCH)
    import prune

    ours = np.array([[True, False, True], [True, True, False]])  # [in 2, out 3]
    theirs = ours.T.copy()  # torch layout [out, in]
    theirs[0, 1] = ~theirs[0, 1]
    masks = {'layers': [{'q_proj': ours}, {'q_proj': ours}]}
    total, per_layer = prune.mask_agreement(masks, {(0, 'q_proj'): theirs, (1, 'q_proj'): ours.T})
    assert per_layer == [5 / 6, 1.0] and total == pytest.approx(11 / 12)


def test_matching_small_sweep_prints_its_table(tmp_path):
    out = _run(
        [os.path.join(BENCH, 'matching.py'), '--sizes=64,128', '--d=256', '--block_size=32', '--nowrite'], tmp_path
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]
    assert [r['n'] for r in rows] == [64, 128]
    assert all(r['matched_fraction'] == pytest.approx(r['expected_fraction']) for r in rows)
    assert '`python bench/matching.py --sizes=64,128 --d=256 --block_size=32`' in out.stdout


def test_scaling_rejects_bad_multipliers(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(BENCH, 'scaling.py'), '--multipliers=1,-2', '--nowrite'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "--multipliers='1,-2'; accepted: positive numbers" in out.stderr
