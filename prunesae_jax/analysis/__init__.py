"""The paper's measures (RQ1-RQ5, docs/method.md) as pure functions over arrays.

matching: mutual-nearest-neighbour / optimal matching of decoder directions, max cosine.
measures: the research questions, one module each (stability, survival, transfer, fragility,
          causal, convergence), each with its array functions and its registered
          measure(dense, condition) -> dict (measures/__init__.py: the registry and its order).
splice:   an SAE reconstruction spliced into the residual stream, and the losses that follow.
stats:    bootstrap, cluster bootstrap and seed-level bootstrap CIs, Spearman, Kendall's W.
checks:   the one finite / non-empty input check every public function uses.
"""

from prunesae_jax.analysis.checks import check_finite, check_nonempty
from prunesae_jax.analysis.matching import (
    MatchResult,
    cosine_matrix,
    max_cosine,
    mnn_match,
    nearest_neighbours,
    normalize_rows,
    optimal_match,
)
from prunesae_jax.analysis.measures.causal import (
    CausalEffects,
    SurvivalCausal,
    attribution,
    causal_agreement,
    causal_effects,
    survival_causal_correlation,
)
from prunesae_jax.analysis.measures.fragility import (
    Fragility,
    count_rho_minus_one,
    firing_quintiles,
    firing_rate,
    fragility,
    survival_by_quintile,
)
from prunesae_jax.analysis.measures.stability import SeedStability, seed_stability, tau_agreement
from prunesae_jax.analysis.measures.survival import FeatureSurvival, feature_survival
from prunesae_jax.analysis.measures.transfer import (
    ce_loss_recovered,
    fvu,
    jaccard_active,
    kl_divergence,
    l0,
    next_token_loss,
)
from prunesae_jax.analysis.stats import (
    FEW_SEEDS,
    Interval,
    SeedInterval,
    bootstrap_ci,
    cluster_bootstrap_ci,
    difference_ci,
    kendalls_w,
    matched_bootstrap_ci,
    pearson,
    rankdata,
    seed_bootstrap_ci,
    seed_difference_ci,
    spearman,
    spearman_ci,
    two_way_bootstrap_ci,
)

__all__ = [
    'MatchResult',
    'cosine_matrix',
    'max_cosine',
    'mnn_match',
    'nearest_neighbours',
    'normalize_rows',
    'optimal_match',
    'check_finite',
    'check_nonempty',
    'CausalEffects',
    'FeatureSurvival',
    'Fragility',
    'SeedStability',
    'SurvivalCausal',
    'attribution',
    'causal_agreement',
    'causal_effects',
    'ce_loss_recovered',
    'count_rho_minus_one',
    'feature_survival',
    'firing_quintiles',
    'firing_rate',
    'fragility',
    'fvu',
    'jaccard_active',
    'kl_divergence',
    'l0',
    'next_token_loss',
    'seed_stability',
    'survival_by_quintile',
    'survival_causal_correlation',
    'tau_agreement',
    'FEW_SEEDS',
    'Interval',
    'SeedInterval',
    'bootstrap_ci',
    'cluster_bootstrap_ci',
    'difference_ci',
    'kendalls_w',
    'matched_bootstrap_ci',
    'pearson',
    'rankdata',
    'seed_bootstrap_ci',
    'seed_difference_ci',
    'spearman',
    'spearman_ci',
    'two_way_bootstrap_ci',
]
