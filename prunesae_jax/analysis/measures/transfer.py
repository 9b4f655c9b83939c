"""RQ3, transfer: one fixed dictionary applied to the pruned model's activations (docs/method.md,
"RQ3").

FVU, L0 and the Jaccard overlap of active sets compare the dictionary's codes and reconstruction on
the dense and the pruned model, token by token on the same held-out tokens; CE loss recovered
splices the reconstruction into the residual stream (analysis/splice.py). The 'transfer' measure
gives each a percentile CI that resamples the held-out sequences (tokens of one sequence are not
independent).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunesae_jax.analysis import splice
from prunesae_jax.analysis.checks import check_finite, check_nonempty
from prunesae_jax.analysis.measures.base import Condition, Dense, register
from prunesae_jax.analysis.stats import bootstrap_ci
from prunesae_jax.errors import InputError
from prunesae_jax.sharding import layer_activations

__all__ = [
    'fvu',
    'l0',
    'jaccard_active',
    'next_token_loss',
    'ce_loss_recovered',
    'kl_divergence',
    'heldout_activations',
    'measure_transfer',
]


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
        raise InputError(f'x shape {x.shape}, x_hat shape {x_hat.shape}; expected two arrays [N, d] of one shape')
    check_nonempty(x, 'x', 'at least one token of a non-empty width [N, d]')
    check_finite(x, 'x', 'finite activations')
    check_finite(x_hat, 'x_hat', 'finite reconstructions')
    if not np.ptp(x, axis=0).any():  # no variance to explain
        return float('nan')
    from prunesae_jax.sae.common import fvu as fvu_traced  # pylint: disable=g-import-not-at-top

    return float(jax.jit(fvu_traced)(x, x_hat))


def l0(codes) -> float:
    """Mean number of active (nonzero) features per token. codes [N, n]."""
    codes = jnp.asarray(codes)
    if codes.ndim != 2:
        raise InputError(f'codes shape {codes.shape}; expected [N tokens, n latents]')
    check_nonempty(codes, 'codes', 'at least one token [N >= 1, n]', axis=0)
    check_finite(codes, 'codes', 'finite feature activations')
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
        raise InputError(f'codes_a shape {a.shape}, codes_b shape {b.shape}; expected two arrays [N, n] of one shape')
    check_nonempty(a, 'codes_a', 'at least one token [N >= 1, n]', axis=0)
    check_finite(a, 'codes_a', 'finite feature activations')
    check_finite(b, 'codes_b', 'finite feature activations')
    j = _jaccard(a, b)
    return np.asarray(j) if per_token else float(jnp.mean(j))


def _token_mask(mask, shape) -> jnp.ndarray:
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    mask = jnp.asarray(mask)
    if mask.shape != tuple(shape):
        raise InputError(f'mask shape {mask.shape}; expected {tuple(shape)}')
    check_finite(mask, 'mask', 'a finite 0/1 token mask')
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
            f'logits shape {logits.shape}, tokens shape {tokens.shape}; expected [B, T, V] and [B, T] with T >= 2'
        )
    check_nonempty(logits, 'logits', 'at least one sequence and a non-empty vocabulary')
    check_finite(logits, 'logits', 'finite logits')
    m = _token_mask(mask, tokens.shape)
    if not bool(jnp.any((m[:, 1:] * m[:, :-1]) != 0)):
        raise InputError('mask leaves no next-token target (no two adjacent real tokens); expected at least one')
    return float(_next_token_loss(logits, tokens, m))


def ce_loss_recovered(clean_loss: float, spliced_loss: float, zero_ablation_loss: float) -> float:
    """CE loss recovered, as SAELens' `ce_loss_score`:

        (L_zero - L_spliced) / (L_zero - L_clean)

    L_clean: the model's loss; L_spliced: with the SAE reconstruction spliced in at the
    hook; L_zero: with the hooked activation set to zero. 1 = the reconstruction loses
    nothing, 0 = as bad as zero-ablation (can fall outside [0, 1]). nan if L_zero == L_clean.
    """
    clean, spliced, zero = float(clean_loss), float(spliced_loss), float(zero_ablation_loss)
    for name, v in (('clean_loss', clean), ('spliced_loss', spliced), ('zero_ablation_loss', zero)):
        check_finite(np.float64(v), name, 'a finite loss in nats')
    den = zero - clean
    if den == 0.0:
        return float('nan')
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
        raise InputError(f'logits_ref shape {a.shape}, logits shape {b.shape}; expected one shape [..., V]')
    check_nonempty(a, 'logits_ref', 'at least one token and a non-empty vocabulary')
    check_finite(a, 'logits_ref', 'finite logits')
    check_finite(b, 'logits', 'finite logits')
    m = _token_mask(mask, a.shape[:-1])
    if not bool(jnp.any(m != 0)):
        raise InputError('mask is all zero; expected at least one token to average the KL over')
    return float(_kl(a, b, m))


def heldout_activations(model_cfg, params, rows: np.ndarray, layer: int, batch_size: int) -> np.ndarray:
    """[N, D] resid_post of `layer` on the held-out token rows, BOS excluded (Dense.heldout_x)."""
    x = layer_activations(model_cfg, params, rows, layer, batch_size)[:, 1:]
    return x.reshape(-1, x.shape[-1])


@register('transfer')
def measure_transfer(dense: Dense, cond: Condition) -> dict[str, Any]:
    """RQ3 for one condition: the dense dictionary on this condition's held-out activations.

    FVU, L0, Jaccard and CE loss recovered are ratios or means of per-sequence sums; their
    intervals resample the held-out sequences.
    """
    sae_cfg, params, name = dense.dictionary
    rows = cond.heldout
    h_all = layer_activations(cond.model_cfg, cond.params, rows, cond.layer, cond.settings.batch_size)
    B, T, D = h_all.shape
    x = h_all[:, 1:].reshape(-1, D)
    codes = splice.encode_batches(sae_cfg, params, x)
    x_hat = np.asarray(splice.decode(sae_cfg, params, jnp.asarray(codes)))
    dense_codes = splice.encode_batches(sae_cfg, params, dense.heldout_x)
    losses = splice.transfer_losses(
        cond.model_cfg, cond.layer, cond.params, h_all, rows, x_hat, cond.settings.batch_size
    )
    # One row per held-out sequence: the sums each measure is a ratio or mean of.
    per_seq = np.stack(
        [
            ((x - x_hat) ** 2).reshape(B, -1).sum(1),  # FVU numerator
            ((x - x.mean(0)) ** 2).reshape(B, -1).sum(1),  # FVU denominator (around the mean)
            (codes != 0).reshape(B, T - 1, -1).sum(-1).mean(-1),  # L0
            jaccard_active(dense_codes, codes, per_token=True).reshape(B, -1).mean(1),
            *losses,
        ],
        1,
    )
    boot = cond.settings.boot

    def ci(stat):
        return [float(v) for v in bootstrap_ci(per_seq, stat, **boot)[1:]]

    def ce_recovered(a):
        m = a.mean(0)
        return ce_loss_recovered(m[4], m[5], m[6])

    clean, spliced, zero = (float(v) for v in per_seq[:, 4:].mean(0))
    return {
        'dictionary': name,
        'n_tokens': int(x.shape[0]),
        'n_sequences': int(B),
        'fvu': fvu(x, x_hat),
        'fvu_ci': ci(lambda a: a[:, 0].sum() / a[:, 1].sum()),
        'l0': l0(codes),
        'l0_ci': ci(lambda a: a[:, 2].mean()),
        'jaccard': jaccard_active(dense_codes, codes),
        'jaccard_ci': ci(lambda a: a[:, 3].mean()),
        'ce_clean': clean,
        'ce_spliced': spliced,
        'ce_zero': zero,
        'ce_recovered': ce_loss_recovered(clean, spliced, zero),
        'ce_recovered_ci': ci(ce_recovered),
    }
