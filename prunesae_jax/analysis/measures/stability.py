"""RQ1, seed stability: how many features SAEs of different seeds share (docs/method.md, "RQ1").

seed_stability matches every unordered pair of seeds (analysis.matching.mnn_match); the 'stability'
measure reports it per condition, and tau_agreement (Kendall's W) says whether the tau levels rank
the conditions alike.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Sequence

import numpy as np

from prunesae_jax.analysis.matching import _check_tau, mnn_match
from prunesae_jax.analysis.measures.base import Condition, Dense, decoder_stack, interval_dict, register
from prunesae_jax.analysis.stats import FEW_SEEDS, Interval, SeedInterval, kendalls_w, seed_bootstrap_ci
from prunesae_jax.errors import InputError

__all__ = [
    'SeedStability',
    'seed_stability',
    'tau_agreement',
    'condition_stability',
    'measure_stability',
    'survival_tau_agreement',
]


@dataclasses.dataclass(frozen=True)
class SeedStability:
    """RQ1 result. fractions[k, p]: matched fraction of seed pair p at taus[k];
    shared: mean matched fraction at `tau` over pairs with a CI that resamples SEEDS
    (stats.seed_bootstrap_ci: pairs sharing a seed are not independent);
    divergence = 1 - shared (the paper's seed floor); kendalls_w: agreement of the tau
    levels on the ranking of the seed pairs. pair_min / pair_max: the smallest and largest
    pair fraction at `tau`, to print beside the CI when few_seeds (n_seeds < FEW_SEEDS)."""

    pair_indices: np.ndarray  # [P, 2]
    taus: tuple[float, ...]
    fractions: np.ndarray  # [len(taus), P]
    tau: float
    shared: Interval
    divergence: Interval
    kendalls_w: float
    pair_min: float = float('nan')
    pair_max: float = float('nan')
    n_seeds: int = 0

    @property
    def few_seeds(self) -> bool:
        return self.n_seeds < FEW_SEEDS

    def shared_dict(self) -> dict[str, float]:
        """JSON form of `shared` with the pair range: {estimate, low, high, min, max, n_seeds}."""
        return SeedInterval(*self.shared, self.pair_min, self.pair_max, self.n_seeds)._asdict()


def tau_agreement(scores) -> float:
    """Kendall's W of the rankings that several tau levels give to the same items.

    scores [n_taus, n_items]: e.g. matched fraction (or survival) of each condition at
    tau in {0.6, 0.7, 0.8}. W = 1 when every tau orders the items identically; the paper
    uses it to show conclusions do not hinge on tau = 0.7.
    """
    return kendalls_w(scores)


def seed_stability(
    decoders,
    tau: float = 0.7,
    taus: Sequence[float] = (0.6, 0.7, 0.8),
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    block_size: int = 4096,
) -> SeedStability:
    """RQ1 seed stability: how many features SAEs trained with different seeds share.

    decoders: [S, n, d] (S >= 2 seeds of one condition). For every unordered pair
    (i < j) the MNN matched fraction of D_i against D_j is computed (mnn_match, cosine
    of sign-kept decoder rows >= tau). shared = mean over pairs with a percentile
    bootstrap CI over pairs; divergence = 1 - shared, the seed floor every pruning
    effect is compared with (paper: divergence 0.0273, CI [0.0113, 0.0393] over 22 pairs).
    The same matches are re-thresholded at every tau in `taus`; Kendall's W over the
    pairs summarises whether the tau levels agree. The CI resamples seeds, not pairs
    (stats.seed_bootstrap_ci); pair_min / pair_max give the range of the pair fractions.
    """
    mats = decoder_stack(decoders, 'decoders')
    if len(mats) < 2:
        raise InputError(f'decoders holds {len(mats)} seed(s); expected at least 2 to form seed pairs')
    tau = _check_tau(tau)
    taus = tuple(_check_tau(t) for t in taus)
    pairs = np.array(list(itertools.combinations(range(len(mats)), 2)), dtype=np.int64)
    results = [mnn_match(mats[i], mats[j], tau, block_size) for i, j in pairs]
    fractions = np.array([[r.fraction_at(t) for r in results] for t in taus], dtype=np.float64)
    primary = np.array([r.matched_fraction for r in results], dtype=np.float64)
    boot = seed_bootstrap_ci(primary, pairs, len(mats), n_boot, ci, seed)
    shared = boot.interval
    divergence = Interval(1.0 - shared.estimate, 1.0 - shared.high, 1.0 - shared.low)
    w = tau_agreement(fractions) if len(pairs) >= 2 and len(taus) >= 1 else float('nan')
    return SeedStability(pairs, taus, fractions, tau, shared, divergence, w, boot.min, boot.max, len(mats))


def condition_stability(cond: Condition) -> SeedStability:
    """seed_stability of the condition's SAEs at settings.tau and taus, computed once per condition
    (the 'survival' measure of the dense condition reads the same pairs)."""
    s = cond.settings
    return cond.computed_once('seed_stability', lambda: seed_stability(cond.W_dec, tau=s.tau, taus=s.taus, **s.boot))


@register('stability')
def measure_stability(dense: Dense, cond: Condition) -> dict[str, Any]:
    """RQ1 for one condition: the shared fraction over distinct seed pairs with its seed-resampling
    CI and pair range, the divergence 1 - shared, Kendall's W over the taus and the mean fraction at
    each tau."""
    del dense
    st = condition_stability(cond)
    return {
        'shared': st.shared_dict(),
        'divergence': interval_dict(st.divergence),
        'n_pairs': int(len(st.pair_indices)),
        'kendalls_w': float(st.kendalls_w),
        'by_tau': {str(t): float(np.mean(st.fractions[i])) for i, t in enumerate(cond.settings.taus)},
    }


def survival_tau_agreement(conditions: Sequence[dict], taus: Sequence[float]) -> dict[str, Any] | None:
    """Kendall's W of the rankings the tau levels give the pruned conditions by survival.

    conditions: the results.json entries of the pruned conditions ('survival' with 'by_tau'). None
    with fewer than 2 conditions or 2 taus (nothing to rank).
    """
    names = [str(float(t)) for t in taus]
    if len(conditions) < 2 or len(names) < 2:
        return None
    scores = np.array([[c['survival']['by_tau'][t] for c in conditions] for t in names])
    return {'taus': [float(t) for t in names], 'kendalls_w': float(tau_agreement(scores))}
