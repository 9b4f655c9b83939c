"""Benchmark mnn_match: time and peak memory of blockwise MNN matching of two decoders.

Usage:
  python bench/matching.py                            # sweep, writes '## Matching' in BENCHMARKS.md
  python bench/matching.py --sizes=4096 --nowrite

Each size runs in its own subprocess so that the reported peak RSS (ru_maxrss) belongs to
that size alone. D_b is a row-permuted copy of D_a with every row rotated by a random
angle in [0, 60] degrees towards its own random direction, so a known share of features
lies above tau = 0.7 and the answer can be checked.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

_SIZES = flags.DEFINE_list('sizes', ['2048', '4096', '8192', '16384'], 'Latent counts n (n x n matching).')
_D = flags.DEFINE_integer('d', 2048, 'Model width (decoder row length).')
_BLOCK_SIZE = flags.DEFINE_integer('block_size', 4096, 'Tile size of the blockwise nearest-neighbour pass.')
_REPEATS = flags.DEFINE_integer('repeats', 1, 'Warm repetitions after the first (compiling) call.')
_OUT = flags.DEFINE_string('out', _common.BENCHMARKS, 'Markdown file for the section.')
_WRITE = flags.DEFINE_bool('write', True, "Replace the '## Matching' section of --out.")
_ONE = flags.DEFINE_integer('one', None, 'Internal: measure this one size in this process and print its JSON row.')


def _decoders(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, d), dtype=np.float32)
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    noise = rng.standard_normal((n, d), dtype=np.float32)
    noise -= np.sum(noise * A, axis=1, keepdims=True) * A  # orthogonal to its own row
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    theta = np.deg2rad(rng.uniform(0.0, 60.0, size=(n, 1))).astype(np.float32)
    B = np.cos(theta) * A + np.sin(theta) * noise
    perm = rng.permutation(n)
    return A, B[perm], np.cos(theta[:, 0])


def run_one(n: int, d: int, block_size: int, repeats: int) -> dict:
    import jax

    from prunesae_jax.analysis import mnn_match

    A, B, cos = _decoders(n, d)
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    t0 = time.perf_counter()
    r = mnn_match(A, B, tau=0.7, block_size=block_size)
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = mnn_match(A, B, tau=0.7, block_size=block_size)
        warm.append(time.perf_counter() - t0)
    expected = float(np.mean(cos >= 0.7))
    return {
        'n': n,
        'd': d,
        'block_size': block_size,
        'cold_s': cold,
        'warm_s': min(warm) if warm else float('nan'),
        'matched_fraction': r.matched_fraction,
        'expected_fraction': expected,
        'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        'rss_after_inputs_mib': rss_inputs,
        'full_matrix_mib': n * n * 4 / 2**20,
        'inputs_mib': 2 * n * d * 4 / 2**20,
        'backend': jax.default_backend(),
    }


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments {argv[1:]}')
    if _ONE.value is not None:
        print(json.dumps(run_one(_ONE.value, _D.value, _BLOCK_SIZE.value, _REPEATS.value)))
        return
    rows = []
    for n in [int(s) for s in _SIZES.value]:
        # The same interpreter runs each size in a child process, so that its peak RSS is that size's alone.
        cmd = [
            sys.executable,
            __file__,
            f'--one={n}',
            f'--d={_D.value}',
            f'--block_size={_BLOCK_SIZE.value}',
            f'--repeats={_REPEATS.value}',
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    table = [
        '| n_a = n_b | d | block | first call s (incl. jit) | warm s | matched / expected | peak RSS MiB | '
        'RSS added by matching MiB | inputs MiB | full n x n f32 MiB |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        table.append(
            f'| {r["n"]} | {r["d"]} | {r["block_size"]} | {r["cold_s"]:.1f} | {r["warm_s"]:.1f} | '
            f'{r["matched_fraction"]:.4f} / {r["expected_fraction"]:.4f} | {r["peak_rss_mib"]:.0f} | '
            f'{r["peak_rss_mib"] - r["rss_after_inputs_mib"]:.0f} | '
            f'{r["inputs_mib"]:.0f} | {r["full_matrix_mib"]:.0f} |'
        )
    body = (
        '`mnn_match(D_a, D_b, tau=0.7)` (prunesae_jax/analysis/matching.py), blockwise jitted nearest-neighbour '
        'pass in both directions over [block, block] cosine tiles, float32, HIGHEST matmul precision. '
        f'Machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax backend {rows[0]["backend"] if rows else "?"}'
        ' (shared with other jobs, so times are upper bounds). D_b = permuted copy of D_a with rows rotated by '
        "U[0, 60] degrees; 'expected' is the share rotated by less than acos(0.7). Peak RSS is the whole "
        "process (Python + jax runtime + building the inputs), one subprocess per size; 'RSS added by matching' "
        'is the peak beyond what the process held after building the inputs (device copies, normalised rows, '
        'tiles). It grows linearly with n (O(n d + block^2)); the full n x n matrix is never built.\n'
        f'Reproduce: `python bench/matching.py --sizes={",".join(_SIZES.value)} --d={_D.value} '
        f'--block_size={_BLOCK_SIZE.value}`.\n\n' + '\n'.join(table) + '\n'
    )
    print(body)
    if _WRITE.value:
        _common.write_section('Matching', body, os.path.abspath(_OUT.value))


if __name__ == '__main__':
    app.run(main)
