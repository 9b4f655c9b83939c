r"""Benchmark: how far SAE seeds agree against training steps, tokens and dictionary size.

    python bench/convergence.py                                    # the grid below (about 20 min, 2 cores)
    python bench/convergence.py --runs=640:16:65536:4800 --nowrite  # one row, printed only

The seed-pair shared fraction (the MNN matched fraction of two seeds' decoders at tau 0.7, as
`analysis.seed_stability` computes it for the study's seed floor) of TopK SAEs trained on one
fixed set of residual-stream activations (Gemma 3 270M, resid_post of the middle layer, the
built-in corpus's training split), measured at several points of each run (--snapshots), so one
run gives the whole curve. Each run is `latents:k:unique_tokens:steps` (batch --batch, lr --lr,
--seeds seeds trained together, same data order, distinct inits): the grid varies the dictionary
size (1x / 2x / 4x / 8x of d_model 640), k, and unique tokens at a fixed number of steps. Wall
times are for the whole run on this machine (all seeds, the snapshots' matching excluded).

Writes docs/convergence/convergence.json, docs/convergence/seed_agreement.png and the
'## Convergence' section of BENCHMARKS.md (--nowrite: print only). The study's default budget
(configs/default.py) is chosen from this table.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RUNS = flags.DEFINE_list(
    'runs',
    [
        '640:16:65536:4800',
        '1280:16:65536:4800',
        '640:32:65536:4800',
        '640:16:16384:4800',
        '2560:16:65536:2400',
        '5120:32:65536:2400',
    ],
    'latents:k:unique_tokens:steps of each run.',
)
_MODEL = flags.DEFINE_string('model', 'gemma-3-270m', 'Zoo model whose activations the SAEs read.')
_LAYER = flags.DEFINE_integer('layer', -1, 'resid_post layer (-1 = the middle layer).')
_BATCH = flags.DEFINE_integer('batch', 256, 'Tokens per SAE step.')
_LR = flags.DEFINE_float('lr', 2e-3, 'Adam learning rate (warm-up 100 steps, linear decay over the last 20 %).')
_SEEDS = flags.DEFINE_integer('seeds', 2, 'SAE seeds per run (their pairs give the shared fraction).')
_SNAPSHOTS = flags.DEFINE_list(
    'snapshots', ['0.125', '0.25', '0.5', '1.0'], 'Fractions of the steps at which the seed agreement is measured.'
)
_TAU = flags.DEFINE_float('tau', 0.7, 'MNN cosine threshold.')
_OUT = flags.DEFINE_string('out', os.path.join(_ROOT, 'docs', 'convergence'), 'Folder for the JSON and figure.')
_WRITE = flags.DEFINE_bool('write', True, "Replace BENCHMARKS.md's '## Convergence' section.")


def _activations(model: str, layer: int, n_tokens: int):
    """[n_tokens, d] float32 resid_post of the built-in training split (BOS excluded)."""
    from prunesae_jax import data, models
    from prunesae_jax.sae.store import capture_activations

    cfg, params, tok = models.load_zoo(model)
    layer = cfg.num_layers // 2 if layer == -1 else layer
    seq = 128
    rows = data.take_tokens('builtin', tok, -(-n_tokens // (seq - 1)), seq, split='train', bos_id=cfg.bos_token_id)
    store = capture_activations(cfg, params, rows, layer, None, exclude_bos=True, dtype='float32', batch_size=16)
    return store.x[:n_tokens], layer, cfg.hidden_size


def _run(x, spec: str) -> dict:
    import numpy as np

    from prunesae_jax import analysis
    from prunesae_jax.sae import SAEConfig, TrainConfig, train

    latents, k, unique, steps = (int(v) for v in spec.split(':'))
    if unique > x.shape[0]:
        raise app.UsageError(f'run {spec}: {unique} unique tokens, but only {x.shape[0]} were captured')
    sae_cfg = SAEConfig(d_in=x.shape[1], n_latents=latents, k=k)
    fracs = tuple(float(f) for f in _SNAPSHOTS.value)
    tcfg = TrainConfig(
        n_seeds=_SEEDS.value,
        n_steps=steps,
        batch_size=_BATCH.value,
        lr=_LR.value,
        warmup_steps=min(100, steps // 10),
        snapshot_fracs=fracs,
        progress=False,
    )
    t0 = time.perf_counter()
    res = train(sae_cfg, tcfg, x[:unique])
    wall = time.perf_counter() - t0
    shared = {
        int(st): float(analysis.seed_stability(w, tau=_TAU.value, taus=(_TAU.value,), n_boot=1).shared.estimate)
        for st, w in sorted(res.snapshots.items())
    }
    return {
        'run': spec,
        'latents': latents,
        'k': k,
        'unique_tokens': unique,
        'steps': steps,
        'batch': _BATCH.value,
        'seeds': _SEEDS.value,
        'wall_s': round(wall, 1),
        'shared': {str(st): v for st, v in shared.items()},
        'tokens_seen': {str(st): st * _BATCH.value for st in shared},
        'init_cos': float(np.mean(res.final['init_cos'])),
        'fvu': float(np.mean(res.final['fvu'])),
        'l0': float(np.mean(res.final['l0'])),
        'dead_frac': float(np.mean(res.final['dead_frac'])),
    }


def _table(rows: list[dict]) -> str:
    fr = [float(f) for f in _SNAPSHOTS.value]
    head = (
        '| latents | k | unique tokens | steps | '
        + ' | '.join(f'shared @ {f:.0%}' for f in fr)
        + ' | cos(final, init) | FVU | L0 | dead | wall (s) |'
    )
    lines = [head, '|' + '---|' * (head.count('|') - 1)]
    for r in rows:
        sh = [f'{v:.3f}' for v in r['shared'].values()]
        lines.append(
            f'| {r["latents"]} | {r["k"]} | {r["unique_tokens"]:,} | {r["steps"]:,} | '
            + ' | '.join(sh)
            + f' | {r["init_cos"]:.3f} | {r["fvu"]:.3f} | {r["l0"]:.1f} | {r["dead_frac"]:.3f} | {r["wall_s"]:.0f} |'
        )
    return '\n'.join(lines)


def _figure(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in rows:
        xs = [int(v) for v in r['tokens_seen'].values()]
        ax.plot(
            xs,
            list(r['shared'].values()),
            marker='o',
            label=f'{r["latents"]} latents, k {r["k"]}, {r["unique_tokens"] // 1024}k unique',
        )
    ax.axhline(0.2, ls='--', c='gray', lw=1)
    ax.set_xscale('log')
    ax.set_xlabel('training tokens seen (steps x batch)')
    ax.set_ylabel(f'seed-pair shared fraction (tau {_TAU.value})')
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={'Software': None})
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments {argv[1:]}')
    import _common

    specs = _RUNS.value
    n = max(int(s.split(':')[2]) for s in specs)
    t0 = time.perf_counter()
    x, layer, d = _activations(_MODEL.value, _LAYER.value, n)
    print(f'captured {x.shape[0]} tokens of layer {layer} in {time.perf_counter() - t0:.0f} s', flush=True)
    os.makedirs(_OUT.value, exist_ok=True)
    meta = {
        'model': _MODEL.value,
        'layer': layer,
        'd_model': d,
        'batch': _BATCH.value,
        'lr': _LR.value,
        'seeds': _SEEDS.value,
        'tau': _TAU.value,
        'machine': _common.machine(),
    }
    rows = []
    for spec in specs:
        rows.append(_run(x, spec))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
        # rewritten after every run, so a stopped benchmark keeps the rows it finished
        with open(os.path.join(_OUT.value, 'convergence.json'), 'w') as f:
            json.dump({'meta': meta, 'runs': rows}, f, indent=1)
        _figure(rows, os.path.join(_OUT.value, 'seed_agreement.png'))
    body = (
        f'`bench/convergence.py`: TopK SAEs on {_MODEL.value} resid_post layer {layer} (d {d}), the built-in '
        f'corpus, batch {_BATCH.value}, lr {_LR.value}, {_SEEDS.value} seeds per run (same data order, '
        f'distinct inits); shared = the MNN matched fraction of the seed pair at tau {_TAU.value}, measured '
        f"at each fraction of the run's steps. {meta['machine']}.\n\n"
        + _table(rows)
        + '\n\n![seed agreement against training tokens](docs/convergence/seed_agreement.png)\n'
    )
    print(body)
    if _WRITE.value:
        _common.write_section('Convergence', body)


if __name__ == '__main__':
    app.run(main)
