"""The paper's measures (arXiv 2603.25325, RQ1-RQ5) as pure functions over arrays.

matching: mutual-nearest-neighbour / optimal matching of decoder directions, max cosine.
measures: seed stability, feature survival, transfer (FVU, L0, Jaccard, CE loss recovered, KL),
          fragility by firing-rate quintile, causal relevance.
stats:    bootstrap and cluster bootstrap CIs, Spearman, Kendall's W.
"""

from prunesae_jax.analysis.matching import (
    MatchResult,
    cosine_matrix,
    max_cosine,
    mnn_match,
    nearest_neighbours,
    normalize_rows,
)
from prunesae_jax.analysis.measures import (
    CausalEffects,
    FeatureSurvival,
    Fragility,
    SeedStability,
    attribution,
    causal_effects,
    ce_loss_recovered,
    count_rho_minus_one,
    feature_survival,
    firing_quintiles,
    firing_rate,
    fragility,
    fvu,
    jaccard_active,
    kl_divergence,
    l0,
    next_token_loss,
    seed_stability,
    survival_by_quintile,
    survival_causal_correlation,
    tau_agreement,
)
from prunesae_jax.analysis.stats import (
    Interval,
    bootstrap_ci,
    cluster_bootstrap_ci,
    kendalls_w,
    pearson,
    rankdata,
    spearman,
    spearman_ci,
)

__all__ = [
    "MatchResult", "cosine_matrix", "max_cosine", "mnn_match", "nearest_neighbours", "normalize_rows",
    "CausalEffects", "FeatureSurvival", "Fragility", "SeedStability", "attribution", "causal_effects",
    "ce_loss_recovered", "count_rho_minus_one", "feature_survival", "firing_quintiles", "firing_rate",
    "fragility", "fvu", "jaccard_active", "kl_divergence", "l0", "next_token_loss", "seed_stability",
    "survival_by_quintile", "survival_causal_correlation", "tau_agreement",
    "Interval", "bootstrap_ci", "cluster_bootstrap_ci", "kendalls_w", "pearson", "rankdata", "spearman", "spearman_ci",
]
