"""TopK SAE (Gao et al. 2024; EleutherAI sparsify): the k largest pre-activations per token, ReLU'd.

Trained with hand-written gradients (kernels.topk_sq_err_grads: one gather of the k decoder rows per
token) and the AuxK term, which decodes the residual from dead latents so they revive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prunesae_jax.errors import InputError
from prunesae_jax.sae import common, kernels
from prunesae_jax.sae.arch import Architecture, register

_PARAMS = ('W_enc', 'b_enc', 'W_dec', 'b_dec')


def encode_topk(cfg, params, x):
    """TopK codes as (vals [B, k], idx [B, k]) without the dense [B, n] latent array."""
    if cfg.architecture != 'topk':
        raise InputError(f"encode_topk needs architecture='topk', got {cfg.architecture!r}")
    vals, idx = jax.lax.top_k(common.pre_acts(cfg, params, x), cfg.k)
    return jax.nn.relu(vals), idx


@register('topk')
class TopK(Architecture):
    """z = relu of the k largest pre-activations of each token, 0 elsewhere."""

    uses_k = True
    uses_auxk = True

    def encode(self, cfg, params, pre):
        vals, idx = jax.lax.top_k(pre, cfg.k)
        z = jnp.zeros_like(pre)
        return z.at[jnp.arange(pre.shape[0])[:, None], idx].set(jax.nn.relu(vals))

    def reconstruct(self, cfg, params, x):
        vals, idx = encode_topk(cfg, params, x)
        return kernels.sparse_decode(vals, idx, params['W_dec']) + params['b_dec']

    def loss(self, cfg, params, x, dead, use_aux: bool = True):
        """The loss and aux of loss_and_grads (its gradient is loss_and_grads', not autodiff's)."""
        loss, aux, _ = self.loss_and_grads(cfg, params, x, dead, use_aux)
        return loss, aux

    def loss_and_grads(self, cfg, params, x, dead, use_aux: bool = True):  # pylint: disable=invalid-overridden-method
        """TopK loss, metrics AND gradients of one SAE, written out by hand (no autodiff).

        EleutherAI sparsify's loss (sparse_coder.py) with the batch's total variance
        tv = sum ||x - mean(x)||^2 as the common denominator:
            loss = FVU + aux_coeff * AuxK,   FVU = sum ||x - x_hat||^2 / tv,
            AuxK = min(num_dead / k_aux, 1) * sum ||e_hat - e||^2 / tv,
        e = x - x_hat the detached residual and e_hat the decode (without b_dec) of the k_aux largest
        pre-activations of dead latents. Both terms share tv, so AuxK weighs aux_coeff times the main
        term per unit of squared error (dividing only AuxK by the residual's variance would weigh it
        hundreds of times less, and dead latents would never revive). use_aux=False skips AuxK (the
        caller knows no latent is dead).

        The gradient of each squared-error term, already scaled by its weight in the loss, is computed
        in its forward pass (kernels.topk_pass, one gather of the k decoder rows per token), so there is
        no backward pass, no residuals stored across it and no rescaling afterwards. Returns
        (loss, aux, grads); aux holds aux_loss, mse (per element), l0, fire_count [n] and x_hat.
        """
        w = [params[n] for n in _PARAMS]
        ab = cfg.apply_b_dec_to_input
        xc = x - params['b_dec'] if ab else x
        pre = xc @ params['W_enc'] + params['b_enc']  # [B, n]: the only dense matmul
        pre_sel, idx = jax.lax.top_k(pre, cfg.k)
        inv_tv = 1.0 / common.total_variance(x)
        (sq, vals, x_hat), (grads, *_) = kernels.topk_sq_err_grads(ab, True, *w, x, x, idx, pre_sel, inv_tv)
        fire_count = (
            jnp.zeros((cfg.n_latents,), jnp.int32).at[idx.reshape(-1)].add((vals.reshape(-1) > 0).astype(jnp.int32))
        )
        aux = {'aux_loss': jnp.zeros((), jnp.float32)}
        loss = sq * inv_tv
        if use_aux:
            scale = common.auxk_scale(cfg, dead)
            coef = cfg.aux_coeff * scale * inv_tv
            target = x - x_hat

            def general():
                if kernels.auxk_is_dense(cfg):
                    return kernels.auxk_dense(cfg, params, xc, pre, dead, target, coef)
                a_pre, a_idx = common.auxk_picks(cfg, pre, dead)
                (sq, _, _), (gr, *_) = kernels.topk_sq_err_grads(ab, False, *w, x, target, a_idx, a_pre, coef)
                return sq, gr

            # Usually only a few latents are dead: then AuxK decodes all of them, as small dense matmuls
            # over just their columns (the same numbers as the general paths, tested).
            m = min(kernels.AUXK_SUBSET, cfg.k_aux_eff)
            a_sq, a_grads = jax.lax.cond(
                dead.sum() <= m, lambda: kernels.auxk_few_dead(cfg, params, xc, pre, dead, target, coef, m), general
            )
            a_loss = scale * a_sq * inv_tv
            loss = loss + cfg.aux_coeff * a_loss
            grads = tuple(g + a for g, a in zip(grads, a_grads))
            aux['aux_loss'] = a_loss
        aux.update(mse=sq / (x.shape[0] * cfg.d_in), l0=(vals > 0).sum(-1).mean(), fire_count=fire_count, x_hat=x_hat)
        return loss, aux, dict(zip(_PARAMS, grads))
