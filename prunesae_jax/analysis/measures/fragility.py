"""RQ4, fragility: does a feature's survival depend on how often it fires? (docs/method.md, "RQ4")

The 'fragility' measure bins the dense SAEs' latents by their firing rate over their training
tokens and compares survival across the bins (Q1 rarest .. Q5 most frequent).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from prunesae_jax.analysis.checks import check_finite, check_nonempty
from prunesae_jax.analysis.measures.base import Condition, Dense, interval_dict, register
from prunesae_jax.analysis.measures.survival import condition_survival
from prunesae_jax.analysis.stats import Interval, bootstrap_ci, cluster_bootstrap_ci, spearman, spearman_ci
from prunesae_jax.errors import InputError

__all__ = [
    'firing_rate',
    'firing_quintiles',
    'survival_by_quintile',
    'Fragility',
    'fragility',
    'count_rho_minus_one',
    'measure_fragility',
]

# A quintile needs this many qualifying latents in every seed for the analysis to run.
_MIN_PER_BIN = 10


def firing_rate(codes, threshold: float = 0.0) -> np.ndarray:
    """Per-feature firing rate: the fraction of tokens with code > threshold. codes [N, n] -> [n]."""
    codes = jnp.asarray(codes)
    if codes.ndim != 2:
        raise InputError(f'codes shape {codes.shape}; expected [N tokens, n latents]')
    check_nonempty(codes, 'codes', 'at least one token [N >= 1, n]', axis=0)
    check_finite(codes, 'codes', 'finite feature activations')
    check_finite(np.float64(threshold), 'threshold', 'a finite activation threshold')
    return np.asarray(jnp.mean((codes > threshold).astype(jnp.float32), axis=0))


def firing_quintiles(rates, n_bins: int = 5) -> np.ndarray:
    """Firing-rate bins: 0 = Q1 (rarest) .. n_bins - 1 = Q5 (most frequent).

    rates [n]. Equal-count bins by stable ordinal rank (ties, e.g. many dead features at
    rate 0, are broken by feature index), so every bin holds n / n_bins features even
    when quantile edges would coincide.
    """
    rates = np.asarray(rates)
    if rates.ndim != 1:
        raise InputError(f'rates shape {rates.shape}; expected [n latents]')
    check_finite(rates, 'rates', 'finite firing rates')
    if int(n_bins) < 2 or rates.shape[0] < n_bins:
        raise InputError(f'n_bins={n_bins!r} with {rates.shape[0]} features; expected 2 <= n_bins <= n')
    order = np.argsort(rates, kind='mergesort')
    rank = np.empty(rates.shape[0], np.int64)
    rank[order] = np.arange(rates.shape[0])
    return (rank * int(n_bins)) // rates.shape[0]


def survival_by_quintile(survived, rates, n_bins: int = 5) -> np.ndarray:
    """Mean survival per firing-rate bin (Q1 rarest first). survived [n] (bool or [0, 1]), rates [n]."""
    survived = np.asarray(survived, dtype=np.float64)
    check_finite(survived, 'survived', 'finite survival values in [0, 1]')
    q = firing_quintiles(rates, n_bins)
    if survived.shape != q.shape:
        raise InputError(f'survived shape {survived.shape}; expected {q.shape} like rates')
    return np.bincount(q, weights=survived, minlength=n_bins) / np.bincount(q, minlength=n_bins)


@dataclasses.dataclass(frozen=True)
class Fragility:
    """RQ4 result. per_quintile[b]: survival in bin b pooled over seeds (Q1 rarest first);
    per_seed [S, n_bins]; effect: S(Q1) - S(Q5) with a cluster bootstrap CI (clusters = seeds);
    rho_quintile: Spearman(bin mean firing rate, bin survival) over the bins;
    rho_feature: Spearman(firing rate, survival) over all features, bootstrap CI over features."""

    per_quintile: np.ndarray
    per_seed: np.ndarray
    effect: Interval
    rho_quintile: float
    rho_feature: Interval


def fragility(
    survived,
    rates,
    n_bins: int = 5,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> Fragility:
    """RQ4 feature fragility: does a feature's survival depend on how often it fires?

    survived [S, n] or [n]: per-feature survival of each dense seed's SAE (bool, or the
      share of pruned seeds matched: FeatureSurvival.per_feature); rates [S, n]: the dense
      SAE's firing rates on the dense model (firing_rate).
    Features are binned into firing-rate quintiles within each seed (Q1 rarest .. Q5).
    effect = S(Q1) - S(Q5), pooled over seeds, with a cluster bootstrap CI that resamples
    seeds (features of one SAE are not independent). rho_quintile is the Spearman
    correlation between bin firing rate and bin survival (the paper's rho = -1 means survival
    falls strictly from Q1 to Q5); rho_feature is the same over individual features.
    """
    s = np.asarray(survived, dtype=np.float64)
    r = np.asarray(rates, dtype=np.float64)
    if s.ndim == 1:
        s, r = s[None], r[None]
    if s.ndim != 2 or s.shape != r.shape:
        raise InputError(f'survived shape {s.shape}, rates shape {r.shape}; expected two arrays [S, n] of one shape')
    check_finite(s, 'survived', 'finite survival values in [0, 1]')
    check_finite(r, 'rates', 'finite firing rates')
    bins = np.stack([firing_quintiles(row, n_bins) for row in r])  # [S, n]
    sums = np.stack([np.bincount(b, weights=x, minlength=n_bins) for b, x in zip(bins, s)])
    counts = np.stack([np.bincount(b, minlength=n_bins) for b in bins]).astype(np.float64)
    rate_sums = np.stack([np.bincount(b, weights=x, minlength=n_bins) for b, x in zip(bins, r)])
    per_seed = sums / counts
    per_quintile = sums.sum(0) / counts.sum(0)
    bin_rate = rate_sums.sum(0) / counts.sum(0)

    def effect_of(clusters) -> float:
        tot = np.sum([c[0] for c in clusters], axis=0) / np.sum([c[1] for c in clusters], axis=0)
        return float(tot[0] - tot[-1])

    effect = cluster_bootstrap_ci(list(zip(sums, counts)), effect_of, n_boot, ci, seed)
    rho_q = spearman(bin_rate, per_quintile)
    rho_f = spearman_ci(r.reshape(-1), s.reshape(-1), n_boot, ci, seed)
    return Fragility(per_quintile, per_seed, effect, rho_q, rho_f)


def count_rho_minus_one(rhos, atol: float = 1e-9) -> int:
    """Number of conditions whose Spearman rho equals -1 (within atol), as the paper counts
    them ("rho = -1.0 in 11 of 17 conditions"); nan rhos do not count."""
    rhos = np.asarray(rhos, dtype=np.float64).reshape(-1)
    if np.any(np.isinf(rhos)):
        check_finite(np.where(np.isnan(rhos), 0.0, rhos), 'rhos', 'correlations in [-1, 1] or nan')
    return int(np.sum(np.isfinite(rhos) & (np.abs(rhos + 1.0) <= atol)))


@register('fragility')
def measure_fragility(dense: Dense, cond: Condition) -> dict[str, Any] | None:
    """RQ4 for one pruned condition (None for the dense one) on the dense SAEs' training firing rates.

    Only latents that fired at least settings.min_firings times in training enter the quintiles (a
    rarer latent's rate is a handful of ties); when fewer than 10 per quintile qualify in some seed
    the analysis is not run and the reason is recorded. Seeds keep their qualifying latents,
    truncated to a common count (a seed with more drops its rarest qualifying latents) so that the
    per-seed arrays stack.
    """
    if cond.is_dense:
        return None
    s = cond.settings
    boot = s.boot
    per_feature = condition_survival(dense, cond).per_feature
    rates = np.asarray(dense.training['firing_rate'], np.float64)  # [S, n]
    seen = dense.training['n_steps'] * dense.training['batch_size']
    ok = rates * seen >= s.min_firings
    n_ok = ok.sum(1)
    need = _MIN_PER_BIN * s.n_quintiles
    if n_ok.min() < need:
        return {
            'not_run': f'only {int(n_ok.min())} latents of a dense seed fired >= analysis.min_firings='
            f'{s.min_firings} times in training; the quintiles need >= {need}'
        }
    keep = int(n_ok.min())
    order = [np.argsort(-np.where(ok[i], rates[i], -1.0), kind='stable')[:keep] for i in range(len(rates))]
    surv = np.stack([per_feature[i][o] for i, o in enumerate(order)])
    rate = np.stack([rates[i][o] for i, o in enumerate(order)])
    fr = fragility(surv, rate, n_bins=s.n_quintiles, **boot)
    q_ci = []
    for q in range(fr.per_seed.shape[1]):
        col = fr.per_seed[:, q]
        q_ci.append([float(v) for v in bootstrap_ci(col, None, **boot)[1:]] if col.size >= 2 else None)
    return {
        'per_quintile': fr.per_quintile.tolist(),
        'per_quintile_ci': q_ci,
        'effect': interval_dict(fr.effect),
        'rho_quintile': float(fr.rho_quintile),
        'rho_feature': interval_dict(fr.rho_feature),
        'rates_from': 'training',
        'training_tokens': int(seen),
        'min_firings': s.min_firings,
        'n_latents': keep,
        'n_latents_total': int(rates.shape[1]),
    }
