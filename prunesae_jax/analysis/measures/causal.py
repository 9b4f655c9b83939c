"""RQ5, causal relevance: does geometric survival predict a feature's effect on the loss?
(docs/method.md, "RQ5")

Each dense feature's causal effect is measured once, in the dense model (`dense_effects`: dense SAE
seed 0, reconstruction error kept so that the clean loss is the model's); the 'causal' measure
correlates it per pruned condition with the feature's survival (its max cosine to that condition's
SAEs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prunesae_jax.analysis import splice
from prunesae_jax.analysis.checks import check_finite
from prunesae_jax.analysis.measures.base import Condition, Dense, Settings, interval_dict, register
from prunesae_jax.analysis.measures.survival import condition_survival
from prunesae_jax.analysis.stats import Interval, pearson, spearman, spearman_ci
from prunesae_jax.errors import InputError
from prunesae_jax.sharding import layer_activations

__all__ = [
    'attribution',
    'CausalEffects',
    'causal_effects',
    'causal_agreement',
    'SurvivalCausal',
    'survival_causal_correlation',
    'dense_effects',
    'measure_causal',
]

# The scatter of survival against effect in results.json shows at most this many live features (a
# seeded subset); the correlation uses all of them.
_SCATTER_POINTS = 512


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
        raise InputError(f'codes shape {c.shape}, grads shape {g.shape}; expected one shape [..., n]')
    check_finite(c, 'codes', 'finite feature activations')
    check_finite(g, 'grads', 'finite gradients')
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
        raise InputError(f'codes shape {codes.shape}; expected [..., n latents]')
    check_finite(codes, 'codes', 'finite feature activations')
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
            raise InputError(f'features span [{idx.min()}, {idx.max()}]; expected indices in [0, {n})')

    @jax.jit
    def ablated(c, ids):
        # Sequential map: one ablated forward at a time keeps memory at one pass.
        return jax.lax.map(lambda i: loss_fn(c * (jnp.arange(n) != i).astype(c.dtype)), ids)

    exact = (
        np.asarray(ablated(codes, jnp.asarray(idx, jnp.int32)), np.float64) - float(clean) if idx.size else np.zeros(0)
    )
    est_sub = estimate[idx].astype(np.float64)
    return CausalEffects(
        clean_loss=float(clean),
        estimate=estimate,
        exact_idx=idx,
        exact=exact,
        pearson=pearson(est_sub, exact) if idx.size >= 2 else float('nan'),
        spearman=spearman(est_sub, exact) if idx.size >= 2 else float('nan'),
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
        raise InputError(f'exact_idx has {idx.size} entries and exact {ex.size}; expected one effect per index')
    check_finite(est, 'estimate', 'finite attribution effects')
    check_finite(ex, 'exact', 'finite ablation effects')
    if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= est.size):
        raise InputError(f'exact_idx holds {idx.tolist()[:5]}...; expected integer feature indices in [0, {est.size})')
    if idx.size < 3:
        return Interval(float('nan'), float('nan'), float('nan'))
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
        raise InputError(f'max_cos has {x.size} values and effect {y.size}; expected one value per feature each')
    check_finite(x, 'max_cos', 'finite survival values')
    check_finite(y, 'effect', 'finite causal effects')
    if live is None:
        keep = np.ones(x.shape, bool)
    else:
        lv = np.asarray(live).reshape(-1)
        if lv.shape != x.shape:
            raise InputError(f'live has {lv.size} values for {x.size} features; expected one per feature')
        if lv.dtype != bool:
            check_finite(lv, 'live', 'a bool mask or non-negative firing counts')
            if np.any(lv < 0):
                raise InputError(f'live has a negative count at [{int(np.argmax(lv < 0))}]; expected counts >= 0')
        keep = lv > 0
    n_live = int(keep.sum())
    if n_live == 0:
        raise InputError(f'none of the {x.size} features fires (live is all False / 0); expected at least one')
    x, y = x[keep], y[keep]
    primary = spearman_ci(x, np.abs(y), n_boot, ci, seed)
    signed = spearman_ci(x, y, n_boot, ci, seed)
    return SurvivalCausal(*primary, signed, n_live, int(keep.size))


def dense_effects(
    model_cfg, params, layer: int, rows: np.ndarray, sae_cfg, sae_params: dict, n_features: int, settings: Settings
) -> dict[str, Any]:
    """The causal effects of one dictionary's features on the model's loss over token rows [B, T].

    Every feature gets the attribution estimate; n_features active ones are also ablated exactly,
    and the agreement of the two is bootstrapped. Returns the plain JSON record Dense.causal is.
    """
    h = layer_activations(model_cfg, params, rows, layer, settings.batch_size)
    loss_fn, codes = splice.causal_loss(model_cfg, layer, params, h, rows, sae_cfg, sae_params)
    eff = causal_effects(loss_fn, codes, n_exact=n_features, seed=settings.seed)
    agreement = causal_agreement(eff.estimate, eff.exact_idx, eff.exact, **settings.boot)
    return {
        'clean_loss': eff.clean_loss,
        'estimate': eff.estimate.tolist(),
        'exact_idx': eff.exact_idx.tolist(),
        'exact': eff.exact.tolist(),
        'fires': np.asarray(eff.fires).tolist(),
        'n_tokens': int(codes.shape[0]),
        'pearson': eff.pearson,
        'spearman': eff.spearman,
        'agreement': interval_dict(agreement),
    }


@register('causal')
def measure_causal(dense: Dense, cond: Condition) -> dict[str, Any] | None:
    """RQ5 for one pruned condition (None for the dense one): Spearman(survival, |effect|) over the
    dense features that fire on the causal tokens, the signed correlation beside it, and the
    attribution-vs-ablation agreement. Survival is the max cosine of dense seed 0's features (the
    seed whose effects were measured)."""
    if cond.is_dense:
        return None
    s = cond.settings
    causal = dense.causal
    fires = np.asarray(causal['fires'], np.int64)
    if s.causal_measure == 'exact':
        idx = np.asarray(causal['exact_idx'], np.int64)
        effect = np.asarray(causal['exact'], np.float64)
    else:
        idx = np.arange(len(causal['estimate']))
        effect = np.asarray(causal['estimate'], np.float64)
    cos = condition_survival(dense, cond).max_cos[0][idx]
    corr = survival_causal_correlation(cos, effect, live=fires[idx], **s.boot)
    live = np.flatnonzero(fires[idx] > 0)
    keep = np.sort(np.random.default_rng(s.seed).permutation(live.size)[:_SCATTER_POINTS])
    return {
        'n_features': int(idx.size),
        'n_live': int(corr.n_live),
        'measure': s.causal_measure,
        'correlation': interval_dict(corr.interval),
        'correlation_signed': interval_dict(corr.signed),
        'agreement': causal['agreement'],
        'agreement_features': len(causal['exact_idx']),
        'max_cos': cos[live][keep].tolist(),
        'effect': effect[live][keep].tolist(),
    }
