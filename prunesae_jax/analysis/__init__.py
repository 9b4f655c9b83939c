"""The paper's measures (arXiv 2603.25325, RQ1-RQ5) as pure functions over arrays.

matching: mutual-nearest-neighbour / optimal matching of decoder directions, max cosine.
measures: seed stability, feature survival, transfer (FVU, L0, Jaccard, CE loss recovered, KL),
          fragility by firing-rate quintile, causal relevance.
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
)
from prunesae_jax.analysis.measures import (
    CausalEffects,
    FeatureSurvival,
    Fragility,
    SeedStability,
    SurvivalCausal,
    attribution,
    causal_agreement,
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
    FEW_SEEDS,
    Interval,
    SeedInterval,
    bootstrap_ci,
    cluster_bootstrap_ci,
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
    "MatchResult", "cosine_matrix", "max_cosine", "mnn_match", "nearest_neighbours", "normalize_rows",
    "check_finite", "check_nonempty",
    "CausalEffects", "FeatureSurvival", "Fragility", "SeedStability", "SurvivalCausal", "attribution",
    "causal_agreement", "causal_effects",
    "ce_loss_recovered", "count_rho_minus_one", "feature_survival", "firing_quintiles", "firing_rate",
    "fragility", "fvu", "jaccard_active", "kl_divergence", "l0", "next_token_loss", "seed_stability",
    "survival_by_quintile", "survival_causal_correlation", "tau_agreement",
    "FEW_SEEDS", "Interval", "SeedInterval", "bootstrap_ci", "cluster_bootstrap_ci", "kendalls_w",
    "matched_bootstrap_ci", "pearson", "rankdata", "seed_bootstrap_ci", "seed_difference_ci", "spearman",
    "spearman_ci", "two_way_bootstrap_ci",
]
