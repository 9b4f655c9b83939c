"""Benchmark: TopK SAE training throughput, vmapped seeds vs sequential runs, vs a plain matmul, vs SAELens.

    nice python bench/sae.py --quick     # d_in 640, S = 1, 4, 2 timed steps (a few minutes)
    python bench/sae.py                  # the issue's grid: d_in 640 and 2304, S = 1, 4, 8, 16
    python bench/sae.py --saelens_python=<venv>/bin/python   # also SAELens, from a venv with sae-lens

Shapes: 8x latents, k 32; d_in 640 (5120 latents, Gemma 3 270M) at batch 4096 and d_in 2304 (18432 latents,
Gemma 2 2B) at a smaller batch (--batch_2304, default 1024) so the grid fits in minutes. For each d_in and
S it reports, measured in one run with the variants interleaved step by step:
- our vmapped step over S seeds (make_train_step with n_seeds=S);
- S sequential single-seed steps (our step with n_seeds=1, one SAE after another);
- SAELens training S SAEs one after another (TopKTrainingSAE.training_forward_pass + torch.optim.Adam, dense
  decode, in the venv of --saelens_python via a subprocess; not measured without that flag): the sum of the
  per-step times of S single-SAE runs;
- tokens x seeds / s, the useful GFLOP/s (2*B*d*n encoder + 6*B*k*d sparse decode and its gradients, per
  seed) and its fraction of a plain jitted fp32 matmul [B, d] @ [d, n] timed in the same run.
Rows whose state would not fit in the available memory are skipped and say so. Results replace the
"## SAE training" section of BENCHMARKS.md (--nowrite to only print).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prunesae_jax.sae import SAEConfig, TrainConfig, arch, kernels  # noqa: E402
from prunesae_jax.sae.train import init_state, make_train_step  # noqa: E402

import _common  # noqa: E402

EXPANSION, K = 8, 32

_QUICK = flags.DEFINE_bool(
    'quick',
    False,
    'd_in 640, S = 1, 4, 2 timed steps, 1 SAELens run (default: the full grid, d_in 640 and 2304, S = 1, 4, 8, 16).',
)
_DIMS = flags.DEFINE_list('dims', None, 'd_in values (latents = 8 x d_in).')
_SEEDS = flags.DEFINE_list('seeds', None, 'S values.')
_STEPS = flags.DEFINE_integer('steps', None, 'Timed steps per variant (min is reported).')
_BATCH = flags.DEFINE_integer('batch', 4096, 'Tokens per step at d_in 640.')
_BATCH_2304 = flags.DEFINE_integer('batch_2304', 1024, 'Tokens per step at any larger d_in.')
_SAELENS_PYTHON = flags.DEFINE_string(
    'saelens_python', None, 'Python of a venv with sae-lens installed; without it SAELens is not measured.'
)
_SAELENS_RUNS = flags.DEFINE_integer(
    'saelens_runs', None, 'Sequential SAELens runs measured per d_in (default: the largest S; fewer are scaled up).'
)
_SAELENS_STEPS = flags.DEFINE_integer('saelens_steps', None, 'Timed SAELens steps per run.')
_AUX_DEAD_FRAC = flags.DEFINE_float(
    'aux_dead_frac',
    None,
    'Also time S=1 at the first d_in with this share of latents dead (AuxK every step); 0 = skip.',
)
_PROFILE = flags.DEFINE_bool('profile', True, 'Break down one S=1 step.')
_OUT = flags.DEFINE_string('out', _common.BENCHMARKS, 'Markdown file for the section.')
_WRITE = flags.DEFINE_bool('write', True, "Replace the '## SAE training' section of --out.")

# the numbers before this benchmark's rewrite (git 0db95ae, bench/sae.py of then, 2 CPUs, load ~3.5-4)
BEFORE = (
    'Before (git 0db95ae; d_in 640, batch 4096, load 3.5-4.1): S=1 step 0.772 s (5,305 tokens/s), '
    'fraction of matmul 0.35; S=8 vmapped 5.333 s vs 8 sequential 6.308 s = 1.18x; SAELens 2.009 s per '
    'step per SAE = 2.6x slower than ours at S=1.'
)

SAELENS_SCRIPT = r"""
import json, sys, time, torch
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
d, n, k, b, steps, runs = (int(a) for a in sys.argv[1:7])
x = torch.randn(b, d, generator=torch.Generator().manual_seed(0))
dead = torch.zeros(n, dtype=torch.bool)
out = []
for run in range(runs):  # S sequential runs: one SAE at a time, as S separate SAELens trainings would be
    torch.manual_seed(run)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
    def step():
        o = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                     n_training_steps=0, is_logging_step=False))
        o.loss.backward(); opt.step(); opt.zero_grad()
    step()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
    out.append(min(ts))
    del sae, opt
print(json.dumps({"step_s": out, "torch_threads": torch.get_num_threads(), "torch": torch.__version__}))
"""


def _mem_available_gb() -> float:
    try:
        with open('/proc/meminfo') as f:
            return next(int(l.split()[1]) for l in f if l.startswith('MemAvailable')) / 2**20
    except (OSError, StopIteration):
        return float('inf')


def _state_gb(d, n, b, s) -> float:
    """Peak bytes of an S-seed step: params + 2 Adam moments + gradients (4 x 2*d*n floats per seed), the
    [B, n] pre-activations of one seed and the batch."""
    return (16 * 2 * d * n * s + 4 * b * n * 2 + 4 * b * d * 4) / 2**30


def _interleaved(fns: dict, steps: int) -> dict:
    """Min wall time per call of each fn, calling them in turn `steps` times after a warm-up call each."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for _ in range(steps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in ts.items()}


def _matmul_fn(b, d, n):
    x = jax.random.normal(jax.random.key(0), (b, d))
    w = jax.random.normal(jax.random.key(1), (d, n))
    f = jax.jit(lambda a, c: a @ c)
    return lambda: f(x, w).block_until_ready()


def _ours_fns(d, n, b, s, dead_frac=0.0, distinct_sequential=True):
    """(vmapped step over S seeds, S sequential single-seed steps) as zero-argument callables."""
    cfg = SAEConfig(d, n, k=K)
    x = np.asarray(jax.random.normal(jax.random.key(2), (b, d)))
    xb = jnp.asarray(x)
    n_dead = int(n * dead_frac)
    vm = {'s': init_state(cfg, TrainConfig(n_steps=10_000, n_seeds=s, batch_size=b), x[:1024])}
    step_v = make_train_step(cfg, TrainConfig(n_steps=10_000, n_seeds=s, batch_size=b))

    def run_v():
        if n_dead:  # re-mark them every step: a dead latent that fires in this batch comes back to life
            vm['s']['since_fired'] = vm['s']['since_fired'].at[:, :n_dead].set(2**30)
        vm['s'], _ = step_v(vm['s'], xb)
        jax.block_until_ready(vm['s']['params']['W_dec'])

    if s == 1:
        return run_v, None
    # S single-seed states stepped in turn; at large d_in a pool of 2 stands in for S (same work per step:
    # a state of hundreds of MB is never in cache, so which SAE a step updates does not change its cost)
    n_states = s if distinct_sequential else min(s, 2)
    t1 = TrainConfig(n_steps=10_000, n_seeds=1, batch_size=b)
    seq = [init_state(cfg, TrainConfig(n_steps=10_000, seed=i, batch_size=b), x[:1024]) for i in range(n_states)]
    step_1 = make_train_step(cfg, t1)

    def run_q():
        for i in range(s):
            j = i % n_states
            seq[j], _ = step_1(seq[j], xb)
        jax.block_until_ready([q['params']['W_dec'] for q in seq])

    return run_v, run_q


def profile_step(d, n, b, steps) -> dict:
    """Seconds of the pieces of one single-seed step at (d, n, b), timed in turn: the encoder matmul, the
    top-k, the chunked sparse decode + both weight gradients (kernels.topk_pass), all gradients
    (arch.get('topk').loss_and_grads), the fused Adam update, the whole step, and the whole step at a tiny shape
    (d 16, 128 latents, batch 64: the fixed per-step cost that running S seeds in one step can save)."""
    cfg = SAEConfig(d, n, k=K)
    x = jnp.asarray(np.asarray(jax.random.normal(jax.random.key(2), (b, d))))
    p = jax.tree.map(
        lambda a: a[0], init_state(cfg, TrainConfig(n_steps=10, batch_size=b), np.asarray(x[:1024]))['params']
    )
    pre = x @ p['W_enc']
    sel, idx = jax.lax.top_k(pre, K)
    no_dead = jnp.zeros((n,), bool)
    mm = jax.jit(lambda a, w: a @ w)
    tk = jax.jit(lambda a: jax.lax.top_k(a, K))
    sp = jax.jit(lambda v, i: kernels.topk_pass(x, x, v, i, p['W_dec'], 1.0 / b))
    gr = jax.jit(lambda q: arch.get('topk').loss_and_grads(cfg, q, x, no_dead, False))
    g = gr(p)[2]
    ok = jnp.ones((1,), bool)
    ad = jax.jit(
        lambda q, gg: {
            k: kernels.adam_apply(
                q[k][None], gg[k][None], q[k][None], q[k][None], ok, 1e-4, 0.9, 0.999, 5.0, k == 'W_dec'
            )
            for k in q
        }
    )
    step_1, _ = _ours_fns(d, n, b, 1)
    tiny, _ = _ours_fns(16, 128, 64, 1)
    fns = {
        'matmul': lambda: mm(x, p['W_enc']).block_until_ready(),
        'top_k': lambda: jax.block_until_ready(tk(pre)),
        'sparse_pass': lambda: jax.block_until_ready(sp(sel, idx)),
        'grads': lambda: jax.block_until_ready(gr(p)),
        'adam': lambda: jax.block_until_ready(ad(p, g)),
        'step': step_1,
        'tiny_step': tiny,
    }
    return _interleaved(fns, steps)


def bench_saelens(python, d, n, b, steps, runs):
    """Per-step seconds of `runs` sequential single-SAE SAELens trainings (one subprocess)."""
    with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f:
        f.write(SAELENS_SCRIPT)
    try:
        out = subprocess.run(
            [python, f.name, str(d), str(n), str(K), str(b), str(steps), str(runs)],
            capture_output=True,
            text=True,
            timeout=3600,
        )
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f'SAELens run failed: {out.stderr[-2000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments {argv[1:]}')
    saelens_python = _SAELENS_PYTHON.value
    if saelens_python and not os.path.isfile(saelens_python):
        raise app.UsageError(
            f'--saelens_python={saelens_python!r} is not a file; expected the python of a venv with sae-lens installed'
        )
    quick = _QUICK.value
    dims = [int(v) for v in (_DIMS.value or (['640'] if quick else ['640', '2304']))]
    seeds = [int(v) for v in (_SEEDS.value or (['1', '4'] if quick else ['1', '4', '8', '16']))]
    steps = _STEPS.value or (2 if quick else 3)
    sl_runs = _SAELENS_RUNS.value or (1 if quick else max(seeds))
    sl_steps = _SAELENS_STEPS.value or (1 if quick else 2)
    aux_frac = _AUX_DEAD_FRAC.value if _AUX_DEAD_FRAC.value is not None else (0.0 if quick else 0.1)
    use_sl = bool(saelens_python)
    load = lambda: os.getloadavg()[0]  # the machine may be shared: record the load next to each number
    loads = [load()]

    rows, sl_res, aux, prof = [], {}, None, None
    for d in dims:
        n, b = EXPANSION * d, (_BATCH.value if d == 640 else _BATCH_2304.value)
        useful = 2 * b * d * n + 6 * b * K * d  # FLOPs per SAE step
        mm = _matmul_fn(b, d, n)
        for s in seeds:
            need = _state_gb(d, n, b, s) + (_state_gb(d, n, b, 2) if s > 1 else 0)
            avail = _mem_available_gb()
            if need > 0.8 * avail:
                rows.append(dict(d=d, n=n, B=b, S=s, skipped=f'needs ~{need:.0f} GB, {avail:.0f} GB available'))
                print(json.dumps(rows[-1]), flush=True)
                continue
            run_v, run_q = _ours_fns(d, n, b, s, distinct_sequential=d * n * s <= 640 * 5120 * 16)
            fns = {'matmul': mm, 'vmapped': run_v}
            if run_q is not None:
                fns['sequential'] = run_q
            t = _interleaved(fns, steps)
            del run_v, run_q, fns
            t.setdefault('sequential', t['vmapped'])
            r = dict(
                d=d,
                n=n,
                B=b,
                S=s,
                matmul_s=t['matmul'],
                matmul_gflops=2 * b * d * n / t['matmul'] / 1e9,
                vmapped_step_s=t['vmapped'],
                sequential_step_s=t['sequential'],
                speedup=t['sequential'] / t['vmapped'],
                tok_seeds_per_s=b * s / t['vmapped'],
                useful_gflops=useful * s / t['vmapped'] / 1e9,
                load=load(),
            )
            r['frac_matmul'] = r['useful_gflops'] / r['matmul_gflops']
            loads.append(r['load'])
            rows.append(r)
            print(json.dumps(r), flush=True)
        if _PROFILE.value and d == dims[0]:
            prof = dict(profile_step(d, n, b, steps), d=d, B=b, load=load())
            print('profile', json.dumps(prof), flush=True)
        if aux_frac and d == dims[0]:
            run_a, _ = _ours_fns(d, n, b, 1, dead_frac=aux_frac)
            aux = dict(d=d, B=b, step_s=_interleaved({'a': run_a}, steps)['a'], load=load())
            del run_a
            print('AuxK', json.dumps(aux), flush=True)
        if use_sl:
            res = bench_saelens(saelens_python, d, n, b, sl_steps, min(sl_runs, max(seeds)))
            res['load'] = load()
            loads.append(res['load'])
            sl_res[d] = res
            print('SAELens', d, json.dumps(res), flush=True)
        jax.clear_caches()

    def sl_time(d, s):  # S sequential SAELens runs: the sum of their per-step times (scaled from fewer runs)
        ts = sl_res[d]['step_s']
        return (sum(ts[:s]), False) if len(ts) >= s else (float(np.mean(ts)) * s, True)

    lines = [
        '',
        f'`bench/sae.py {" ".join(sys.argv[1:])}` ({_common.machine()}; 1-min load average '
        f'{min(loads):.1f}-{max(loads):.1f} during the run). TopK, 8x latents, k {K}, fp32; for each row the '
        f'matmul, the vmapped step and the S sequential steps are timed in turn, {steps} times after a warm-up, '
        'min reported. Useful FLOPs per SAE step = 2*B*d_in*n (encoder) + 6*B*k*d_in (sparse decode and its '
        'gradients); the fraction divides by the plain jitted fp32 matmul [B, d_in] @ [d_in, n] of the same row. '
        'SAELens = S single-SAE `TopKTrainingSAE.training_forward_pass` + `torch.optim.Adam` runs one after '
        'another (dense decode; `use_sparse_activations=True` is not implemented for torch CPU), the sum of '
        'their per-step times'
        + (
            f' (torch {next(iter(sl_res.values()))["torch"]}, {next(iter(sl_res.values()))["torch_threads"]} threads)'
            if sl_res
            else ''
        )
        + '.',
        '',
        '| d_in | latents | batch | S | matmul GFLOP/s | vmapped step (s) | S sequential steps (s) | vmapped / '
        'sequential | tokens x seeds / s | useful GFLOP/s | fraction of matmul | SAELens S runs (s) | SAELens / '
        'ours vmapped | load |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        if 'skipped' in r:
            lines.append(f'| {r["d"]} | {r["n"]} | {r["B"]} | {r["S"]} | skipped: {r["skipped"]} |' + ' |' * 9)
            continue
        sl = 'not measured'
        ratio = ''
        if r['d'] in sl_res:
            t_sl, scaled = sl_time(r['d'], r['S'])
            sl = f'{t_sl:.3f}' + (' (scaled)' if scaled else '')
            ratio = f'{t_sl / r["vmapped_step_s"]:.1f}x'
            r['saelens_ratio'] = t_sl / r['vmapped_step_s']
        lines.append(
            f'| {r["d"]} | {r["n"]} | {r["B"]} | {r["S"]} | {r["matmul_gflops"]:.1f} | '
            f'{r["vmapped_step_s"]:.3f} | {r["sequential_step_s"]:.3f} | {r["speedup"]:.2f}x | '
            f'{r["tok_seeds_per_s"]:,.0f} | {r["useful_gflops"]:.1f} | {r["frac_matmul"]:.2f} | {sl} | '
            f'{ratio} | {r["load"]:.1f} |'
        )
    lines.append('')
    if aux:
        lines += [
            f'With {aux_frac:.0%} of the latents dead (AuxK, k_aux = d_in/2, runs every step), d_in {aux["d"]}, '
            f'S=1: {aux["step_s"]:.3f} s per step = {aux["B"] / aux["step_s"]:,.0f} tokens / s '
            f'(load {aux["load"]:.1f}).',
            '',
        ]
    if prof:
        ms = {k: prof[k] * 1e3 for k in ('matmul', 'top_k', 'sparse_pass', 'grads', 'adam', 'step', 'tiny_step')}
        lines += [
            f'Where one S=1 step goes (d_in {prof["d"]}, batch {prof["B"]}, pieces jitted and timed in turn, '
            f'load {prof["load"]:.1f}): whole step {ms["step"]:.0f} ms = encoder matmul {ms["matmul"]:.0f} ms '
            f'+ top-k {ms["top_k"]:.0f} ms + sparse decode with both weight gradients {ms["sparse_pass"]:.0f} ms '
            f'(all gradients together {ms["grads"]:.0f} ms) + fused Adam / decoder projection {ms["adam"]:.0f} '
            f'ms + the rest. The fixed cost of a step (the same step at d_in 16, 128 latents, batch 64) is '
            f'{ms["tiny_step"]:.1f} ms: that is all that S seeds in one step can save over S sequential steps '
            'on a CPU, where S GEMMs batched run at the FLOP rate of S GEMMs in a row.',
            '',
        ]
    lines += [BEFORE, '']
    done = [r for r in rows if 'skipped' not in r]
    first = [r for r in done if r['d'] == dims[0]]
    target = []
    r1 = next((r for r in first if r['S'] == 1), None)
    if r1:
        target.append(
            f'fraction of matmul at d_in {r1["d"]}, S=1: {r1["frac_matmul"]:.2f} (target >= 0.5: '
            f'{"met" if r1["frac_matmul"] >= 0.5 else "missed"})'
        )
    r8 = next((r for r in first if r['S'] == 8), None) or (first[-1] if len(first) > 1 else None)
    if r8:
        target.append(
            f'vmapped / sequential at S={r8["S"]}: {r8["speedup"]:.2f}x (target >= 1.5x: '
            f'{"met" if r8["speedup"] >= 1.5 else "missed"})'
        )
    if r1 and 'saelens_ratio' in r1:
        target.append(
            f'SAELens / ours per SAE at S=1: {r1["saelens_ratio"]:.1f}x (target >= 5x: '
            f'{"met" if r1["saelens_ratio"] >= 5 else "missed"})'
        )
    lines += ['Against the targets: ' + '; '.join(target) + '.', '']
    if r1 and 'saelens_ratio' in r1:
        sl_mm = r1['saelens_ratio'] * r1['vmapped_step_s'] / r1['matmul_s']
        ours_mm = r1['vmapped_step_s'] / r1['matmul_s']
        lines += [
            f"In units of the encoder matmul of the same row: SAELens' step costs {sl_mm:.1f} (its dense decode "
            f'and backward are ~5 such GEMMs), ours {ours_mm:.1f} (1 GEMM + top-k + sparse pass + Adam); 5x '
            f'needs ours <= {sl_mm / 5:.1f}, i.e. everything but the encoder GEMM in '
            f'{max(sl_mm / 5 - 1, 0):.1f} GEMM-times, and a fraction of matmul >= 0.5 needs it in 1.0.',
            '',
        ]
    text = '\n'.join(lines) + '\n'
    print(text)
    if _WRITE.value:
        _common.write_section('SAE training', text, _OUT.value)


if __name__ == '__main__':
    app.run(main)
