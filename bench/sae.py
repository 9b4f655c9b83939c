"""Benchmark: TopK SAE training throughput, vmapped seeds vs sequential, vs a plain matmul, vs SAELens.

    /work/venv/bin/python bench/sae.py [--saelens-python /path/to/venv/bin/python] [--steps 5]

Shapes: d_in 640, 5120 latents (8x), k 32, batch 4096 (the Gemma 3 270M width). Reports
tokens x seeds per second for S = 1, 4, 8 seeds vmapped in one step and for S sequential
single-seed steps; the useful GFLOP/s per SAE step (2*B*d*n for the encoder + 6*B*k*d for the
sparse decode and its gradients) as a fraction of a jitted fp32 matmul [B, d] @ [d, n]; and,
given a python with sae-lens installed, SAELens' TopKTrainingSAE.training_forward_pass + Adam
(one seed after another) on the same shapes, in a subprocess. Results replace the
"## SAE training" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

from prunesae_jax.sae import core  # noqa: E402
from prunesae_jax.sae.train import TrainConfig, init_state, make_train_step  # noqa: E402

D, N, K, B = 640, 5120, 32, 4096

SAELENS_SCRIPT = r"""
import json, sys, time, torch
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
d, n, k, b, steps, sparse = (int(a) for a in sys.argv[1:7])
torch.manual_seed(0)
cfg = TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, use_sparse_activations=bool(sparse))
sae = TopKTrainingSAE(cfg)
opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
x = torch.randn(b, d)
dead = torch.zeros(n, dtype=torch.bool)
def step():
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                   n_training_steps=0, is_logging_step=False))
    out.loss.backward(); opt.step(); opt.zero_grad()
step()
t0 = time.perf_counter()
for _ in range(steps):
    step()
dt = (time.perf_counter() - t0) / steps
print(json.dumps({"step_s": dt, "tokens_per_s": b / dt, "torch_threads": torch.get_num_threads(),
                  "torch": torch.__version__}))
"""


def _time(fn, n):
    fn()  # compile + warm
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_matmul(steps):
    x = jax.random.normal(jax.random.key(0), (B, D))
    w = jax.random.normal(jax.random.key(1), (D, N))
    f = jax.jit(lambda a, b: a @ b)
    dt = _time(lambda: f(x, w).block_until_ready(), max(steps, 5))
    return dt, 2 * B * D * N / dt / 1e9


def bench_ours(n_seeds, steps, dead_frac=0.0):
    """dead_frac > 0 marks that share of latents dead, so every step also runs AuxK (k_aux = d_in/2)."""
    cfg = core.SAEConfig(D, N, k=K)
    t = TrainConfig(n_steps=10_000, n_seeds=n_seeds, batch_size=B, progress=False)
    x = np.asarray(jax.random.normal(jax.random.key(2), (B, D)))
    state = {"s": init_state(cfg, t, x[:1024])}
    step = make_train_step(cfg, t)
    xb = jnp.asarray(x)
    n_dead = int(N * dead_frac)

    def run():
        if n_dead:  # re-mark them every step: a dead latent that fires in this batch comes back to life
            state["s"]["since_fired"] = state["s"]["since_fired"].at[:, :n_dead].set(2**30)
        state["s"], m = step(state["s"], xb)
        jax.block_until_ready(state["s"]["params"]["W_dec"])

    return _time(run, steps)


def bench_sequential(n_seeds, steps):
    """S independent single-seed runs, one step each in turn (the SAELens way, with our step)."""
    cfg = core.SAEConfig(D, N, k=K)
    t = TrainConfig(n_steps=10_000, n_seeds=1, batch_size=B, progress=False)
    x = jnp.asarray(jax.random.normal(jax.random.key(2), (B, D)))
    states = [init_state(cfg, TrainConfig(n_steps=10_000, seed=s, batch_size=B), np.asarray(x[:1024]))
              for s in range(n_seeds)]
    step = make_train_step(cfg, t)

    def run():
        for i in range(n_seeds):
            states[i], _ = step(states[i], x)
        jax.block_until_ready([s["params"]["W_dec"] for s in states])

    return _time(run, steps)


def bench_saelens(python, steps, sparse):
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(SAELENS_SCRIPT)
    try:
        out = subprocess.run([python, f.name, str(D), str(N), str(K), str(B), str(steps), str(int(sparse))],
                             capture_output=True, text=True, timeout=1800)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"SAELens run failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    ap.add_argument("--seeds", default="1,4,8")
    ap.add_argument("--saelens-python", default=None, help="python of a venv with sae-lens installed")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--aux-dead-frac", type=float, default=0.1,
                    help="also time S=1 with this share of latents dead (AuxK runs every step); 0 = skip")
    args = ap.parse_args()

    useful = 2 * B * D * N + 6 * B * K * D  # FLOPs per SAE step
    load = lambda: os.getloadavg()[0]  # the machine may be shared: record the load next to each number
    mm_load = load()
    mm_dt, mm_gflops = bench_matmul(args.steps)
    print(f"matmul [{B},{D}]@[{D},{N}]: {mm_dt * 1e3:.1f} ms, {mm_gflops:.1f} GFLOP/s", flush=True)
    rows = []
    for s in [int(v) for v in args.seeds.split(",")]:
        dt_v = bench_ours(s, args.steps)
        dt_q = bench_sequential(s, args.steps) if s > 1 else dt_v
        r = dict(S=s, vmapped_step_s=dt_v, vmapped_tok_seeds_per_s=B * s / dt_v, sequential_step_s=dt_q,
                 sequential_tok_seeds_per_s=B * s / dt_q, speedup=dt_q / dt_v,
                 useful_gflops=useful * s / dt_v / 1e9)
        r["frac_matmul"] = r["useful_gflops"] / mm_gflops
        r["load"] = load()
        rows.append(r)
        print(json.dumps(r), flush=True)
    aux_dt = bench_ours(1, args.steps, args.aux_dead_frac) if args.aux_dead_frac else None
    aux_load = load()
    if aux_dt:
        print(f"S=1 with {args.aux_dead_frac:.0%} dead latents (AuxK every step): {aux_dt:.3f} s", flush=True)
    sl = []
    if args.saelens_python:
        # use_sparse_activations=True raises NotImplementedError ('aten::view' on SparseCPU) in torch CPU builds
        for sparse in (False,):
            res = bench_saelens(args.saelens_python, max(2, args.steps // 2), sparse)
            res["use_sparse_activations"] = sparse
            res["load"] = load()
            sl.append(res)
            print("SAELens", json.dumps(res), flush=True)

    ours_1 = rows[0]["vmapped_tok_seeds_per_s"]
    best = max(rows, key=lambda r: r["vmapped_tok_seeds_per_s"])
    lines = [
        "",
        f"`bench/sae.py` (TopK, d_in {D}, {N} latents, k {K}, batch {B}, fp32; {args.steps} timed steps after a "
        f"warm-up step; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, jax {jax.__version__}; "
        f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, all in one run). Useful FLOPs per SAE "
        f"step = 2*B*d_in*n (encoder) + 6*B*k*d_in (sparse decode and its gradients) = {useful / 1e9:.2f} GFLOP.",
        "",
        f"Plain jitted fp32 matmul [{B},{D}] @ [{D},{N}]: {mm_dt * 1e3:.1f} ms = {mm_gflops:.1f} GFLOP/s "
        f"(1-min load average {mm_load:.1f}).",
        "",
        "| seeds S | vmapped step (s) | vmapped tokens x seeds / s | S sequential steps (s) | sequential tokens x seeds / s "
        "| vmapped / sequential | useful GFLOP/s | fraction of matmul | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['S']} | {r['vmapped_step_s']:.3f} | {r['vmapped_tok_seeds_per_s']:,.0f} | "
                     f"{r['sequential_step_s']:.3f} | {r['sequential_tok_seeds_per_s']:,.0f} | {r['speedup']:.2f}x | "
                     f"{r['useful_gflops']:.1f} | {r['frac_matmul']:.2f} | {r['load']:.1f} |")
    lines.append("")
    if aux_dt:
        lines.append(f"With {args.aux_dead_frac:.0%} of the latents dead (AuxK, k_aux = {D // 2}, runs every step), S=1: "
                     f"{aux_dt:.3f} s per step = {B / aux_dt:,.0f} tokens / s (load {aux_load:.1f}).")
        lines.append("")
    if sl:
        lines.append("SAELens (`TopKTrainingSAE.training_forward_pass` + `torch.optim.Adam`, one seed, same shapes, "
                     f"torch {sl[0]['torch']} with {sl[0]['torch_threads']} threads, in a separate venv):")
        lines.append("")
        # S SAEs trained together at T tokens x seeds / s cost what S SAELens runs at T tokens / s each cost
        lines.append("| SAELens variant | step (s) | tokens / s per SAE | ours S=1 / SAELens | ours best (S="
                     f"{best['S']}, tokens x seeds / s) / SAELens | load |")
        lines.append("|---|---|---|---|---|---|")
        for res in sl:
            lines.append(f"| use_sparse_activations={res['use_sparse_activations']} | {res['step_s']:.3f} | "
                         f"{res['tokens_per_s']:,.0f} | {ours_1 / res['tokens_per_s']:.1f}x | "
                         f"{best['vmapped_tok_seeds_per_s'] / res['tokens_per_s']:.1f}x | {res['load']:.1f} |")
    else:
        lines.append("SAELens: not measured in this run (pass `--saelens-python` with a venv that has sae-lens).")
    lines.append("")
    last = rows[-1]
    target = [f"fraction of matmul at S=1 {rows[0]['frac_matmul']:.2f} (target >= 0.5)",
              f"vmapped / sequential at S={last['S']} {last['speedup']:.2f}x (target >= 1.5x)"]
    if sl:
        target.append(f"ours S=1 / SAELens {ours_1 / sl[0]['tokens_per_s']:.1f}x (target >= 5x)")
    lines.append("Against the targets: " + "; ".join(target) + ".")
    lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        _common.write_section('SAE training', text, args.out)


if __name__ == "__main__":
    main()
