"""The paper's five research questions as pure functions over arrays.

Definitions follow arXiv 2603.25325 ("How Pruning Reshapes Features", Borobia et al. 2026;
written out in docs/method.md); where the paper is silent they follow SAELens (FVU around the
mean, CE loss recovered) and say so in the docstring.

  RQ1 seed_stability, tau_agreement          features shared by SAEs of different seeds
  RQ2 feature_survival                       dense-model features with an MNN match after pruning
  RQ3 fvu, l0, jaccard_active, next_token_loss, ce_loss_recovered, kl_divergence
                                             a fixed dictionary applied to the pruned model
  RQ4 firing_rate, firing_quintiles, survival_by_quintile, fragility, count_rho_minus_one
                                             does survival depend on how often a feature fires
  RQ5 attribution, causal_effects, survival_causal_correlation
                                             does geometric survival predict causal importance

Decoders are W_dec [n_latents, d] (rows = feature directions); "decoders" of several seeds
are a stacked [S, n, d] array or a sequence of [n, d] arrays.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prunesae_jax.errors import InputError
from prunesae_jax.analysis.checks import check_finite, check_nonempty
from prunesae_jax.analysis.matching import _check_tau, mnn_match
from prunesae_jax.analysis.stats import (
    FEW_SEEDS,
    Interval,
    SeedInterval,
    cluster_bootstrap_ci,
    kendalls_w,
    matched_bootstrap_ci,
    pearson,
    seed_bootstrap_ci,
    spearman,
    spearman_ci,
    two_way_bootstrap_ci,
)


def _as_stack(decoders, name: str) -> list[np.ndarray]:
    if isinstance(decoders, (list, tuple)):
        mats = [np.asarray(D) for D in decoders]
    else:
        arr = np.asarray(decoders)
        mats = [arr] if arr.ndim == 2 else list(arr) if arr.ndim == 3 else None
        if mats is None:
            raise InputError(f"{name} has shape {arr.shape}; expected [S, n, d], [n, d] or a sequence of [n, d]")
    for k, D in enumerate(mats):
        if D.ndim != 2:
            raise InputError(f"{name} holds a matrix of shape {D.shape}; expected decoder matrices [n, d]")
        check_finite(D, f"{name}[{k}]", "finite decoder rows")
    return mats


# ----------------------------------------------------------------------------- RQ1


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
    pair_min: float = float("nan")
    pair_max: float = float("nan")
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
    mats = _as_stack(decoders, "decoders")
    if len(mats) < 2:
        raise InputError(f"decoders holds {len(mats)} seed(s); expected at least 2 to form seed pairs")
    tau = _check_tau(tau)
    taus = tuple(_check_tau(t) for t in taus)
    pairs = np.array(list(itertools.combinations(range(len(mats)), 2)), dtype=np.int64)
    results = [mnn_match(mats[i], mats[j], tau, block_size) for i, j in pairs]
    fractions = np.array([[r.fraction_at(t) for r in results] for t in taus], dtype=np.float64)
    primary = np.array([r.matched_fraction for r in results], dtype=np.float64)
    boot = seed_bootstrap_ci(primary, pairs, len(mats), n_boot, ci, seed)
    shared = boot.interval
    divergence = Interval(1.0 - shared.estimate, 1.0 - shared.high, 1.0 - shared.low)
    w = tau_agreement(fractions) if len(pairs) >= 2 and len(taus) >= 1 else float("nan")
    return SeedStability(pairs, taus, fractions, tau, shared, divergence, w, boot.min, boot.max, len(mats))


# ----------------------------------------------------------------------------- RQ2


@dataclasses.dataclass(frozen=True)
class FeatureSurvival:
    """RQ2 result. fractions[p]: matched fraction of dense seed pair_indices[p, 0] against
    pruned seed pair_indices[p, 1]; survival: their mean with a CI that resamples seeds
    (two-way over dense and pruned seeds, one-way for pairing='same_seed');
    per_feature[s, i] in [0, 1]: share of the pruned seeds paired with dense seed s in which
    dense feature i has an MNN match; max_cos[s, i]: its max cosine to the pruned
    dictionary, averaged over those pruned seeds. survival_seeds: the same CI with the
    range of the pair fractions and the seed count (SeedInterval)."""

    pair_indices: np.ndarray  # [P, 2]
    fractions: np.ndarray  # [P]
    tau: float
    survival: Interval
    per_feature: np.ndarray  # [S_dense, n]
    max_cos: np.ndarray  # [S_dense, n]
    survival_seeds: SeedInterval | None = None
    pairing: str = "all"


def feature_survival(
    dense_decoders,
    pruned_decoders,
    tau: float = 0.7,
    pairing: str = "all",
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
    max cosine feed RQ4 and RQ5.
    """
    dense = _as_stack(dense_decoders, "dense_decoders")
    pruned = _as_stack(pruned_decoders, "pruned_decoders")
    tau = _check_tau(tau)
    if pairing == "all":
        pairs = [(i, j) for i in range(len(dense)) for j in range(len(pruned))]
    elif pairing == "same_seed":
        if len(dense) != len(pruned):
            raise InputError(
                f"pairing='same_seed' with {len(dense)} dense and {len(pruned)} pruned seeds; expected equal counts"
            )
        pairs = [(i, i) for i in range(len(dense))]
    elif pairing == "distinct":
        pairs = [(i, j) for i in range(len(dense)) for j in range(len(pruned)) if i != j]
        if not pairs:
            raise InputError("pairing='distinct' with a single dense and pruned seed; expected at least 2 seeds")
    else:
        raise InputError(f"pairing={pairing!r}; expected 'all', 'distinct' or 'same_seed'")
    n = dense[0].shape[0]
    if any(D.shape[0] != n for D in dense):
        raise InputError(f"dense decoders have latent counts {[D.shape[0] for D in dense]}; expected one size")
    matched_sum = np.zeros((len(dense), n))
    cos_sum = np.zeros((len(dense), n))
    count = np.zeros(len(dense))
    fractions = []
    for i, j in pairs:
        r = mnn_match(dense[i], pruned[j], tau, block_size)
        fractions.append(r.matched_fraction)
        matched_sum[i] += r.matched
        cos_sum[i] += r.max_cos_a
        count[i] += 1
    fractions = np.array(fractions, dtype=np.float64)
    pairs = np.array(pairs, dtype=np.int64)
    if pairing == "same_seed":
        boot = matched_bootstrap_ci(fractions, n_boot, ci, seed)
    else:
        boot = two_way_bootstrap_ci(fractions, pairs, len(dense), len(pruned), n_boot, ci, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_feature = matched_sum / count[:, None]
        max_cos = cos_sum / count[:, None]
    return FeatureSurvival(pairs, fractions, tau, boot.interval, per_feature, max_cos, boot, pairing)


# ----------------------------------------------------------------------------- RQ3


@jax.jit
def _fvu(x, x_hat):
    x = jnp.asarray(x, jnp.float32)
    x_hat = jnp.asarray(x_hat, jnp.float32)
    num = jnp.sum(jnp.square(x - x_hat))
    den = jnp.sum(jnp.square(x - jnp.mean(x, axis=0, keepdims=True)))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def fvu(x, x_hat) -> float:
    """Fraction of variance unexplained, around the mean (SAELens' corrected definition;
    the paper's RQ3 transfer diagnostic):

        FVU = sum_{t,k} (x_tk - xhat_tk)^2 / sum_{t,k} (x_tk - mean_t(x)_k)^2

    x, x_hat [N, d] (tokens x model width). 0 = perfect reconstruction, 1 = no better than
    predicting the per-dimension mean; > 1 is possible. nan if x is constant over tokens.
    """
    x = np.asarray(x)
    x_hat = np.asarray(x_hat)
    if x.ndim != 2 or x.shape != x_hat.shape:
        raise InputError(f"x shape {x.shape}, x_hat shape {x_hat.shape}; expected two arrays [N, d] of one shape")
    check_nonempty(x, "x", "at least one token of a non-empty width [N, d]")
    check_finite(x, "x", "finite activations")
    check_finite(x_hat, "x_hat", "finite reconstructions")
    return float(_fvu(x, x_hat))


def l0(codes) -> float:
    """Mean number of active (nonzero) features per token. codes [N, n]."""
    codes = jnp.asarray(codes)
    if codes.ndim != 2:
        raise InputError(f"codes shape {codes.shape}; expected [N tokens, n latents]")
    check_nonempty(codes, "codes", "at least one token [N >= 1, n]", axis=0)
    check_finite(codes, "codes", "finite feature activations")
    return float(jnp.mean(jnp.sum(codes != 0, axis=1).astype(jnp.float32)))


@jax.jit
def _jaccard(a, b):
    a = a != 0
    b = b != 0
    inter = jnp.sum(a & b, axis=1)
    union = jnp.sum(a | b, axis=1)
    # Two empty active sets are identical: Jaccard 1.
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0).astype(jnp.float32)


def jaccard_active(codes_a, codes_b, per_token: bool = False):
    """Token-by-token Jaccard overlap of active-feature sets (paper RQ3, inferred definition).

    codes_a, codes_b [N, n]: codes of ONE fixed dictionary on the same N tokens, e.g. from
    the dense model and from the pruned model. J_t = |A_t & B_t| / |A_t | B_t| with
    A_t = {i : codes_a[t, i] != 0}; J_t = 1 when both sets are empty. Returns the mean over
    tokens, or the [N] per-token values when per_token=True.
    """
    a = jnp.asarray(codes_a)
    b = jnp.asarray(codes_b)
    if a.ndim != 2 or a.shape != b.shape:
        raise InputError(f"codes_a shape {a.shape}, codes_b shape {b.shape}; expected two arrays [N, n] of one shape")
    check_nonempty(a, "codes_a", "at least one token [N >= 1, n]", axis=0)
    check_finite(a, "codes_a", "finite feature activations")
    check_finite(b, "codes_b", "finite feature activations")
    j = _jaccard(a, b)
    return np.asarray(j) if per_token else float(jnp.mean(j))


def _token_mask(mask, shape) -> jnp.ndarray:
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    mask = jnp.asarray(mask)
    if mask.shape != tuple(shape):
        raise InputError(f"mask shape {mask.shape}; expected {tuple(shape)}")
    check_finite(mask, "mask", "a finite 0/1 token mask")
    return mask.astype(jnp.float32)


@jax.jit
def _next_token_loss(logits, tokens, mask):
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [B, T-1, V]
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    # A target counts only when both it and the position predicting it are real tokens.
    w = mask[:, 1:] * mask[:, :-1]
    return jnp.sum(nll * w) / jnp.sum(w)


def next_token_loss(logits, tokens, mask=None) -> float:
    """Mean next-token cross entropy (nats): logits[:, t] predicts tokens[:, t + 1].

    logits [B, T, V], tokens [B, T] int, mask [B, T] (1 = real token) or None. The clean,
    spliced (SAE reconstruction in place of the activations) and zero-ablated losses of
    ce_loss_recovered are this quantity on three forward passes.
    """
    logits = jnp.asarray(logits)
    tokens = jnp.asarray(tokens, jnp.int32)
    if logits.ndim != 3 or tokens.shape != logits.shape[:2] or tokens.shape[1] < 2:
        raise InputError(
            f"logits shape {logits.shape}, tokens shape {tokens.shape}; expected [B, T, V] and [B, T] with T >= 2"
        )
    check_nonempty(logits, "logits", "at least one sequence and a non-empty vocabulary")
    check_finite(logits, "logits", "finite logits")
    m = _token_mask(mask, tokens.shape)
    if not bool(jnp.any((m[:, 1:] * m[:, :-1]) != 0)):
        raise InputError("mask leaves no next-token target (no two adjacent real tokens); expected at least one")
    return float(_next_token_loss(logits, tokens, m))


def ce_loss_recovered(clean_loss: float, spliced_loss: float, zero_ablation_loss: float) -> float:
    """CE loss recovered, as SAELens' `ce_loss_score`:

        (L_zero - L_spliced) / (L_zero - L_clean)

    L_clean: the model's loss; L_spliced: with the SAE reconstruction spliced in at the
    hook; L_zero: with the hooked activation set to zero. 1 = the reconstruction loses
    nothing, 0 = as bad as zero-ablation (can fall outside [0, 1]). nan if L_zero == L_clean.
    """
    clean, spliced, zero = float(clean_loss), float(spliced_loss), float(zero_ablation_loss)
    for name, v in (("clean_loss", clean), ("spliced_loss", spliced), ("zero_ablation_loss", zero)):
        check_finite(np.float64(v), name, "a finite loss in nats")
    den = zero - clean
    if den == 0.0:
        return float("nan")
    return (zero - spliced) / den


@jax.jit
def _kl(logits_ref, logits, mask):
    lp = jax.nn.log_softmax(logits_ref.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
    return jnp.sum(kl * mask) / jnp.sum(mask)


def kl_divergence(logits_ref, logits, mask=None) -> float:
    """Mean per-token KL(P_ref || P) in nats, P = softmax(logits) over the vocabulary.

    logits_ref [..., V]: the reference (dense model); logits [..., V]: the model under test
    (pruned model, or with the SAE spliced in). mask [...] (1 = count the token) or None.
    """
    a = jnp.asarray(logits_ref)
    b = jnp.asarray(logits)
    if a.shape != b.shape or a.ndim < 1:
        raise InputError(f"logits_ref shape {a.shape}, logits shape {b.shape}; expected one shape [..., V]")
    check_nonempty(a, "logits_ref", "at least one token and a non-empty vocabulary")
    check_finite(a, "logits_ref", "finite logits")
    check_finite(b, "logits", "finite logits")
    m = _token_mask(mask, a.shape[:-1])
    if not bool(jnp.any(m != 0)):
        raise InputError("mask is all zero; expected at least one token to average the KL over")
    return float(_kl(a, b, m))


# ----------------------------------------------------------------------------- RQ4


def firing_rate(codes, threshold: float = 0.0) -> np.ndarray:
    """Per-feature firing rate: the fraction of tokens with code > threshold. codes [N, n] -> [n]."""
    codes = jnp.asarray(codes)
    if codes.ndim != 2:
        raise InputError(f"codes shape {codes.shape}; expected [N tokens, n latents]")
    check_nonempty(codes, "codes", "at least one token [N >= 1, n]", axis=0)
    check_finite(codes, "codes", "finite feature activations")
    check_finite(np.float64(threshold), "threshold", "a finite activation threshold")
    return np.asarray(jnp.mean((codes > threshold).astype(jnp.float32), axis=0))


def firing_quintiles(rates, n_bins: int = 5) -> np.ndarray:
    """Firing-rate bins: 0 = Q1 (rarest) .. n_bins - 1 = Q5 (most frequent).

    rates [n]. Equal-count bins by stable ordinal rank (ties, e.g. many dead features at
    rate 0, are broken by feature index), so every bin holds n / n_bins features even
    when quantile edges would coincide.
    """
    rates = np.asarray(rates)
    if rates.ndim != 1:
        raise InputError(f"rates shape {rates.shape}; expected [n latents]")
    check_finite(rates, "rates", "finite firing rates")
    if int(n_bins) < 2 or rates.shape[0] < n_bins:
        raise InputError(f"n_bins={n_bins!r} with {rates.shape[0]} features; expected 2 <= n_bins <= n")
    order = np.argsort(rates, kind="mergesort")
    rank = np.empty(rates.shape[0], np.int64)
    rank[order] = np.arange(rates.shape[0])
    return (rank * int(n_bins)) // rates.shape[0]


def survival_by_quintile(survived, rates, n_bins: int = 5) -> np.ndarray:
    """Mean survival per firing-rate bin (Q1 rarest first). survived [n] (bool or [0, 1]), rates [n]."""
    survived = np.asarray(survived, dtype=np.float64)
    check_finite(survived, "survived", "finite survival values in [0, 1]")
    q = firing_quintiles(rates, n_bins)
    if survived.shape != q.shape:
        raise InputError(f"survived shape {survived.shape}; expected {q.shape} like rates")
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
        raise InputError(f"survived shape {s.shape}, rates shape {r.shape}; expected two arrays [S, n] of one shape")
    check_finite(s, "survived", "finite survival values in [0, 1]")
    check_finite(r, "rates", "finite firing rates")
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
        check_finite(np.where(np.isnan(rhos), 0.0, rhos), "rhos", "correlations in [-1, 1] or nan")
    return int(np.sum(np.isfinite(rhos) & (np.abs(rhos + 1.0) <= atol)))


# ----------------------------------------------------------------------------- RQ5


def attribution(codes, grads) -> np.ndarray:
    """Gradient x activation estimate of each feature's ablation effect on the loss.

    codes [..., n] feature activations with the SAE spliced in; grads [..., n] dLoss/dcodes.
    Zero-ablating feature i moves its codes by -codes[..., i], so to first order
    loss(ablated) - loss(clean) ~= -sum_t grads[t, i] * codes[t, i] (attribution patching,
    Syed et al. 2023; exact when the loss is linear in the codes). Returns [n].
    """
    c = jnp.asarray(codes, jnp.float32)
    g = jnp.asarray(grads, jnp.float32)
    if c.shape != g.shape or c.ndim < 1:
        raise InputError(f"codes shape {c.shape}, grads shape {g.shape}; expected one shape [..., n]")
    check_finite(c, "codes", "finite feature activations")
    check_finite(g, "grads", "finite gradients")
    return np.asarray(-jnp.sum((c * g).reshape(-1, c.shape[-1]), axis=0))


@dataclasses.dataclass(frozen=True)
class CausalEffects:
    """RQ5 result. estimate [n]: gradient x activation effect of zero-ablating each feature;
    exact_idx [k] / exact [k]: measured loss(ablated) - loss(clean) for a subset;
    pearson / spearman: agreement of estimate[exact_idx] with exact (the check that the
    attribution measures what exact ablation does; `causal_agreement` gives its CI);
    fires [n]: on how many of the causal tokens each feature is active (0 = never fires:
    its attribution is exactly 0 and it is left out of survival_causal_correlation)."""

    clean_loss: float
    estimate: np.ndarray
    exact_idx: np.ndarray
    exact: np.ndarray
    pearson: float
    spearman: float
    fires: np.ndarray | None = None


def causal_effects(
    loss_fn: Callable[[jax.Array], jax.Array],
    codes,
    n_exact: int = 64,
    seed: int = 0,
    features=None,
) -> CausalEffects:
    """RQ5 causal relevance: the effect of ablating each SAE feature on next-token loss.

    loss_fn(codes) -> scalar: a jax-traceable closure that decodes the codes, splices the
      reconstruction into the (pruned) model and returns the mean next-token loss.
    codes [..., n]: the SAE's feature activations on the evaluation tokens.
    All features get the gradient x activation estimate (one backward pass, `attribution`);
    a subset is ablated exactly (its code zeroed on every token, one forward each) to
    validate the estimate. The subset is `features` if given, else n_exact features drawn
    (seeded) among those active on at least one token (a dead feature's effect is exactly 0
    and would inflate the agreement). Reports the Pearson and Spearman correlation of the
    two on the subset.
    """
    codes = jnp.asarray(codes, jnp.float32)
    if codes.ndim < 1:
        raise InputError(f"codes shape {codes.shape}; expected [..., n latents]")
    check_finite(codes, "codes", "finite feature activations")
    n = codes.shape[-1]
    clean, grads = jax.jit(jax.value_and_grad(loss_fn))(codes)
    estimate = attribution(codes, grads)
    fires = np.asarray(jnp.sum(codes.reshape(-1, n) != 0, axis=0), np.int64)
    if features is None:
        active = np.flatnonzero(fires > 0)
        k = min(int(n_exact), active.size)
        rng = np.random.Generator(np.random.PCG64(seed))
        idx = np.sort(rng.choice(active, size=k, replace=False)) if k else np.zeros(0, np.int64)
    else:
        idx = np.asarray(features, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise InputError(f"features span [{idx.min()}, {idx.max()}]; expected indices in [0, {n})")

    @jax.jit
    def ablated(c, ids):
        # Sequential map: one ablated forward at a time keeps memory at one pass.
        return jax.lax.map(lambda i: loss_fn(c * (jnp.arange(n) != i).astype(c.dtype)), ids)

    exact = (
        np.asarray(ablated(codes, jnp.asarray(idx, jnp.int32)), np.float64) - float(clean)
        if idx.size
        else np.zeros(0)
    )
    est_sub = estimate[idx].astype(np.float64)
    return CausalEffects(
        clean_loss=float(clean),
        estimate=estimate,
        exact_idx=idx,
        exact=exact,
        pearson=pearson(est_sub, exact) if idx.size >= 2 else float("nan"),
        spearman=spearman(est_sub, exact) if idx.size >= 2 else float("nan"),
        fires=fires,
    )


def causal_agreement(estimate, exact_idx, exact, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> Interval:
    """Agreement of the attribution estimate with exact ablation: Spearman of
    estimate[exact_idx] with exact over the exactly ablated features, with a percentile
    bootstrap CI over those features (CausalEffects.spearman is its estimate).

    estimate [n] (CausalEffects.estimate), exact_idx [k], exact [k]. Returns
    Interval(nan, nan, nan) with fewer than 3 ablated features (nothing to correlate).
    """
    est = np.asarray(estimate, dtype=np.float64).reshape(-1)
    idx = np.asarray(exact_idx).reshape(-1)
    ex = np.asarray(exact, dtype=np.float64).reshape(-1)
    if idx.shape != ex.shape:
        raise InputError(f"exact_idx has {idx.size} entries and exact {ex.size}; expected one effect per index")
    check_finite(est, "estimate", "finite attribution effects")
    check_finite(ex, "exact", "finite ablation effects")
    if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= est.size):
        raise InputError(f"exact_idx holds {idx.tolist()[:5]}...; expected integer feature indices in [0, {est.size})")
    if idx.size < 3:
        return Interval(float("nan"), float("nan"), float("nan"))
    return spearman_ci(est[idx.astype(np.int64)], ex, n_boot, ci, seed)


class SurvivalCausal(NamedTuple):
    """RQ5 correlation. estimate / low / high: Spearman(survival, |effect|) over the live
    features with its bootstrap CI (the primary figure: importance is |effect|); signed:
    Spearman(survival, effect), the same features; n_live of n_features fire."""

    estimate: float
    low: float
    high: float
    signed: Interval
    n_live: int
    n_features: int

    @property
    def interval(self) -> Interval:
        return Interval(self.estimate, self.low, self.high)


def survival_causal_correlation(
    max_cos,
    effect,
    live=None,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> SurvivalCausal:
    """RQ5: does geometric survival predict causal importance?

    Spearman correlation between each dense feature's survival (its max cosine to the
    pruned-model SAE, FeatureSurvival.max_cos) and its causal importance |effect|
    (CausalEffects.estimate or exact ablation effects), with a percentile bootstrap CI over
    features; the signed correlation is reported beside it (result.signed).
    live [n]: bool mask, or firing counts (CausalEffects.fires; live = count > 0), aligned
      with max_cos / effect. A feature that never fires on the causal tokens has an
      attribution of exactly 0, which says nothing about its importance, so only live
      features are correlated; None = every feature is live.
    The paper reports that survival does not predict causal importance (rho near 0).
    """
    x = np.asarray(max_cos, dtype=np.float64).reshape(-1)
    y = np.asarray(effect, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise InputError(f"max_cos has {x.size} values and effect {y.size}; expected one value per feature each")
    check_finite(x, "max_cos", "finite survival values")
    check_finite(y, "effect", "finite causal effects")
    if live is None:
        keep = np.ones(x.shape, bool)
    else:
        lv = np.asarray(live).reshape(-1)
        if lv.shape != x.shape:
            raise InputError(f"live has {lv.size} values for {x.size} features; expected one per feature")
        if lv.dtype != bool:
            check_finite(lv, "live", "a bool mask or non-negative firing counts")
            if np.any(lv < 0):
                raise InputError(f"live has a negative count at [{int(np.argmax(lv < 0))}]; expected counts >= 0")
        keep = lv > 0
    n_live = int(keep.sum())
    if n_live == 0:
        raise InputError(f"none of the {x.size} features fires (live is all False / 0); expected at least one")
    x, y = x[keep], y[keep]
    primary = spearman_ci(x, np.abs(y), n_boot, ci, seed)
    signed = spearman_ci(x, y, n_boot, ci, seed)
    return SurvivalCausal(*primary, signed, n_live, int(keep.size))
