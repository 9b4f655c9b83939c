"""Convergence: how far one condition's SAEs trained (docs/method.md, "Convergence").

A seed floor read from SAEs that have barely left their init measures training noise, not
structure; the 'convergence' measure records the seed agreement at each decoder snapshot, the
distance from init, the final FVU / L0 / dead fraction and the training curves, so that the report
can say whether the agreement has plateaued. `training_record` builds the record it reads from the
trainer's result.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prunesae_jax.analysis.measures.base import Condition, Dense, register
from prunesae_jax.analysis.measures.stability import seed_stability

__all__ = ['training_record', 'measure_convergence']

# Per-seed metrics of the trainer's final evaluation kept in the record, and the curves' metrics.
_FINAL = ('fvu', 'l0', 'dead_frac')
_CURVES = ('fvu', 'l0', 'dead_frac', 'aux_loss')


def _final_metrics(final) -> dict[str, np.ndarray]:
    """fvu / l0 / dead_frac per seed from TrainResult.final (a dict of [S] or a list of dicts)."""
    if isinstance(final, dict):
        return {k: np.asarray(final[k]).reshape(-1) for k in _FINAL if k in final}
    return {k: np.asarray([f[k] for f in final]).reshape(-1) for k in _FINAL if all(k in f for f in final)}


def _curves(logged: list[dict]) -> dict[str, list[float]]:
    """Training curves from the trainer's log rows: each metric's mean over seeds per logged step."""
    out = {'step': [int(r['step']) for r in logged]}
    for name in _CURVES:
        out[name] = [float(np.mean(r[name])) for r in logged if name in r]
    return out


def training_record(result, n_steps: int, batch_size: int, train_tokens: int) -> dict[str, Any]:
    """The JSON training record of one condition's SAEs (sae.train.TrainResult `result`).

    Per seed: final fvu / l0 / dead_frac and init_cos (cosine of each decoder to its init); the
    step count, batch size and training tokens; the curves (mean over seeds per logged step).
    """
    record = {k: np.asarray(v).tolist() for k, v in _final_metrics(result.final).items()}
    record.update(
        init_cos=np.asarray(result.final['init_cos']).tolist(),
        n_steps=n_steps,
        batch_size=batch_size,
        train_tokens=int(train_tokens),
        curve=_curves(result.metrics),
    )
    return record


@register('convergence')
def measure_convergence(dense: Dense, cond: Condition) -> dict[str, Any]:
    """The seed agreement at settings.tau at each snapshot step, and the training record beside it.

    cond.training holds the record of `training_record` plus 'snapshots' {step: W_dec [S, n, d]}.
    """
    del dense
    s = cond.settings
    tau = float(s.tau)
    record = cond.training
    steps = sorted(record['snapshots'])
    shared = [seed_stability(record['snapshots'][st], tau=tau, taus=(tau,), **s.boot).shared.estimate for st in steps]
    return {
        'n_steps': record['n_steps'],
        'batch_size': record['batch_size'],
        'train_tokens': record['train_tokens'],
        'steps': steps,
        'tokens': [st * record['batch_size'] for st in steps],
        'shared': [float(v) for v in shared],
        'init_cos': record['init_cos'],
        'fvu': record.get('fvu'),
        'l0': record.get('l0'),
        'dead_frac': record.get('dead_frac'),
        'curve': record['curve'],
    }
