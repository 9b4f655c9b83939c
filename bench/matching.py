"""Benchmark mnn_match: time and peak memory of blockwise MNN matching of two decoders.

Usage:
  /work/venv/bin/python bench/matching.py                       # sweep, writes '## Matching' in BENCHMARKS.md
  /work/venv/bin/python bench/matching.py --sizes 4096 --no-write

Each size runs in its own subprocess so that the reported peak RSS (ru_maxrss) belongs to
that size alone. D_b is a row-permuted copy of D_a with every row rotated by a random
angle in [0, 60] degrees towards its own random direction, so a known share of features
lies above tau = 0.7 and the answer can be checked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402



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
        "n": n,
        "d": d,
        "block_size": block_size,
        "cold_s": cold,
        "warm_s": min(warm) if warm else float("nan"),
        "matched_fraction": r.matched_fraction,
        "expected_fraction": expected,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "rss_after_inputs_mib": rss_inputs,
        "full_matrix_mib": n * n * 4 / 2**20,
        "inputs_mib": 2 * n * d * 4 / 2**20,
        "backend": jax.default_backend(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2048,4096,8192,16384", help="comma-separated latent counts n (n x n matching)")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=1, help="warm repetitions after the first (compiling) call")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.d, args.block_size, args.repeats)))
        return
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--one", str(n), "--d", str(args.d), "--block-size", str(args.block_size),
               "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    table = [
        "| n_a = n_b | d | block | first call s (incl. jit) | warm s | matched / expected | peak RSS MiB | "
        "RSS added by matching MiB | inputs MiB | full n x n f32 MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['n']} | {r['d']} | {r['block_size']} | {r['cold_s']:.1f} | {r['warm_s']:.1f} | "
            f"{r['matched_fraction']:.4f} / {r['expected_fraction']:.4f} | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_rss_mib'] - r['rss_after_inputs_mib']:.0f} | "
            f"{r['inputs_mib']:.0f} | {r['full_matrix_mib']:.0f} |"
        )
    body = (
        "`mnn_match(D_a, D_b, tau=0.7)` (prunesae_jax/analysis/matching.py), blockwise jitted nearest-neighbour "
        "pass in both directions over [block, block] cosine tiles, float32, HIGHEST matmul precision. "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax backend {rows[0]['backend'] if rows else '?'}"
        " (shared with other jobs, so times are upper bounds). D_b = permuted copy of D_a with rows rotated by "
        "U[0, 60] degrees; 'expected' is the share rotated by less than acos(0.7). Peak RSS is the whole "
        "process (Python + jax runtime + building the inputs), one subprocess per size; 'RSS added by matching' "
        "is the peak beyond what the process held after building the inputs (device copies, normalised rows, "
        "tiles). It grows linearly with n (O(n d + block^2)); the full n x n matrix is never built.\n"
        f"Reproduce: `/work/venv/bin/python bench/matching.py --sizes {args.sizes} --d {args.d} "
        f"--block-size {args.block_size}`.\n\n" + "\n".join(table) + "\n"
    )
    print(body)
    if not args.no_write:
        _common.write_section('Matching', body, os.path.abspath(args.out))


if __name__ == "__main__":
    main()
