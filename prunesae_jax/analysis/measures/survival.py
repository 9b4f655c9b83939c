"""RQ2, feature survival: the dense model's SAE features that keep an MNN match after pruning
(docs/method.md, "RQ2").

feature_survival matches each dense seed's decoder against each pruned seed's; the 'survival'
measure reports it by the study's pairing:

- 'distinct': every (dense seed i, pruned seed j) pair, trained from different inits (the pruned
  condition's seeds are offset), with a CI that resamples both seed sets. The dense condition's
  own survival is its seed floor: the distinct seed pairs of seed_stability.
- 'shared': the pairs (s, s) of SAEs that started from one init, a CI that resamples s, and the
  init-only null: the matched fraction of dense seed s against its untrained init, i.e. what
  survival would read if the pruned SAE had never left the init it shares.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from prunesae_jax.analysis.matching import _check_tau, max_cosine, mnn_match
from prunesae_jax.analysis.measures.base import Condition, Dense, decoder_stack, register
from prunesae_jax.analysis.measures.stability import condition_stability
from prunesae_jax.analysis.stats import Interval, SeedInterval, matched_bootstrap_ci, two_way_bootstrap_ci
from prunesae_jax.errors import InputError

__all__ = ['FeatureSurvival', 'feature_survival', 'condition_survival', 'measure_survival']

# The study's pairing -> feature_survival's: 'distinct' inits pair every seed with every seed,
# 'shared' inits pair seed s with seed s.
_PAIRING = {'distinct': 'all', 'shared': 'same_seed'}


@dataclasses.dataclass(frozen=True)
class FeatureSurvival:
    """RQ2 result. fractions[p]: matched fraction of dense seed pair_indices[p, 0] against
    pruned seed pair_indices[p, 1]; survival: their mean with a CI that resamples seeds
    (two-way over dense and pruned seeds, one-way for pairing='same_seed');
    per_feature[s, i] in [0, 1]: share of the pruned seeds paired with dense seed s in which
    dense feature i has an MNN match; max_cos[s, i]: its max cosine to the pruned
    dictionary, averaged over those pruned seeds. survival_seeds: the same CI with the
    range of the pair fractions and the seed count (SeedInterval). fractions_by_tau[k, p]:
    the matched fraction of pair p re-thresholded at taus[k]."""

    pair_indices: np.ndarray  # [P, 2]
    fractions: np.ndarray  # [P]
    tau: float
    survival: Interval
    per_feature: np.ndarray  # [S_dense, n]
    max_cos: np.ndarray  # [S_dense, n]
    survival_seeds: SeedInterval | None = None
    pairing: str = 'all'
    taus: tuple[float, ...] = ()
    fractions_by_tau: np.ndarray | None = None  # [len(taus), P]


def feature_survival(
    dense_decoders,
    pruned_decoders,
    tau: float = 0.7,
    pairing: str = 'all',
    taus: Sequence[float] = (0.6, 0.7, 0.8),
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    block_size: int = 4096,
) -> FeatureSurvival:
    """RQ2 feature survival: the fraction of dense-model SAE features that have an MNN
    match (cosine >= tau, sign kept) in an SAE trained on the pruned model's activations.

    dense_decoders [S_d, n, d], pruned_decoders [S_p, m, d].
    pairing='all': every (dense seed, pruned seed) pair; 'distinct': the pairs with
    i != j (when seed s of both conditions starts from the same initialisation, the pair
    (s, s) shares its init and is left out); 'same_seed': pair seed s with seed s (needs
    S_d == S_p). Survival is averaged over the pairs; its CI resamples seeds: dense and
    pruned seeds independently ('all', 'distinct'; stats.two_way_bootstrap_ci) or the
    seed s as one unit ('same_seed'; stats.matched_bootstrap_ci). Per-feature survival and
    max cosine feed RQ4 and RQ5. The same matches are re-thresholded at every tau in `taus`
    (fractions_by_tau), as seed_stability does.
    """
    dense = decoder_stack(dense_decoders, 'dense_decoders')
    pruned = decoder_stack(pruned_decoders, 'pruned_decoders')
    tau = _check_tau(tau)
    taus = tuple(_check_tau(t) for t in taus)
    if pairing == 'all':
        pairs = [(i, j) for i in range(len(dense)) for j in range(len(pruned))]
    elif pairing == 'same_seed':
        if len(dense) != len(pruned):
            raise InputError(
                f"pairing='same_seed' with {len(dense)} dense and {len(pruned)} pruned seeds; expected equal counts"
            )
        pairs = [(i, i) for i in range(len(dense))]
    elif pairing == 'distinct':
        pairs = [(i, j) for i in range(len(dense)) for j in range(len(pruned)) if i != j]
        if not pairs:
            raise InputError("pairing='distinct' with a single dense and pruned seed; expected at least 2 seeds")
    else:
        raise InputError(f"pairing={pairing!r}; expected 'all', 'distinct' or 'same_seed'")
    n = dense[0].shape[0]
    if any(D.shape[0] != n for D in dense):
        raise InputError(f'dense decoders have latent counts {[D.shape[0] for D in dense]}; expected one size')
    matched_sum = np.zeros((len(dense), n))
    cos_sum = np.zeros((len(dense), n))
    count = np.zeros(len(dense))
    fractions = []
    by_tau = []
    for i, j in pairs:
        r = mnn_match(dense[i], pruned[j], tau, block_size)
        fractions.append(r.matched_fraction)
        by_tau.append([r.fraction_at(t) for t in taus])
        matched_sum[i] += r.matched
        cos_sum[i] += r.max_cos_a
        count[i] += 1
    fractions = np.array(fractions, dtype=np.float64)
    pairs = np.array(pairs, dtype=np.int64)
    if pairing == 'same_seed':
        boot = matched_bootstrap_ci(fractions, n_boot, ci, seed)
    else:
        boot = two_way_bootstrap_ci(fractions, pairs, len(dense), len(pruned), n_boot, ci, seed)
    with np.errstate(invalid='ignore', divide='ignore'):
        per_feature = matched_sum / count[:, None]
        max_cos = cos_sum / count[:, None]
    by_tau = np.array(by_tau, dtype=np.float64).reshape(len(pairs), len(taus)).T
    return FeatureSurvival(pairs, fractions, tau, boot.interval, per_feature, max_cos, boot, pairing, taus, by_tau)


def condition_survival(dense: Dense, cond: Condition) -> FeatureSurvival:
    """feature_survival of the dense SAEs in this (pruned) condition's, by settings.pairing,
    computed once per condition (fragility and causal read its per-feature values)."""
    s = cond.settings
    return cond.computed_once(
        'feature_survival',
        lambda: feature_survival(
            dense.W_dec, cond.W_dec, tau=s.tau, pairing=_PAIRING[s.pairing], taus=s.taus, **s.boot
        ),
    )


@register('survival')
def measure_survival(dense: Dense, cond: Condition) -> dict[str, Any]:
    """RQ2 for one condition: the matched fraction over its seed pairs with a CI, the pairs, the
    mean at each tau and the mean max cosine (a threshold-free companion); 'null' for 'shared'."""
    s = cond.settings
    if cond.is_dense:  # dense vs dense over distinct seed pairs is the seed floor itself
        st = condition_stability(cond)
        W = cond.W_dec
        cos = [float(np.mean(max_cosine(W[i], W[j])[0])) for i, j in st.pair_indices]
        return {
            **st.shared_dict(),
            'pairing': 'distinct',
            'fractions': st.fractions[s.taus.index(s.tau)].tolist() if s.tau in s.taus else None,
            'pairs': st.pair_indices.tolist(),
            'by_tau': {str(t): float(np.mean(st.fractions[i])) for i, t in enumerate(s.taus)},
            'mean_max_cos': float(np.mean(cos)),
        }
    fs = condition_survival(dense, cond)
    out = {
        **fs.survival_seeds._asdict(),
        'pairing': s.pairing,
        'fractions': fs.fractions.tolist(),
        'pairs': fs.pair_indices.tolist(),
        'by_tau': {str(t): float(np.mean(fs.fractions_by_tau[k])) for k, t in enumerate(s.taus)},
        'mean_max_cos': float(np.mean(fs.max_cos)),
    }
    if s.pairing == 'shared':
        null = feature_survival(dense.W_dec, dense.W_init, tau=s.tau, pairing='same_seed', taus=(), **s.boot)
        out['null'] = null.survival_seeds._asdict()
    return out
