"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope): a learned threshold per latent, trained
through the rectangle-kernel pseudo-derivatives of kernels.jumprelu / kernels.jump with an L0
penalty."""

from __future__ import annotations

import jax.numpy as jnp

from prunesae_jax.sae import common, kernels
from prunesae_jax.sae.arch import Architecture, register


@register('jumprelu')
class JumpReLU(Architecture):
    """z = pre * (pre > threshold); loss = squared error + l0_coeff * L0."""

    has_threshold = True

    def init_extra(self, cfg):
        return {'threshold': jnp.full((cfg.n_latents,), cfg.jumprelu_init_threshold, jnp.float32)}

    def encode(self, cfg, params, pre):
        return pre * (pre > params['threshold'])

    def loss(self, cfg, params, x, dead, use_aux: bool = True):
        del dead, use_aux  # no AuxK
        pre = common.pre_acts(cfg, params, x)  # [B, n]
        z = kernels.jumprelu(pre, params['threshold'], cfg.jumprelu_bandwidth)
        loss, aux = common.recon_loss(cfg, x, z, common.decode(cfg, params, z))
        l0_smooth = kernels.jump(pre, params['threshold'], cfg.jumprelu_bandwidth).sum(-1).mean()
        return loss + cfg.l0_coeff * l0_smooth, aux

    def after_update(self, cfg, params, new, aux, ok, step, threshold_start):
        """Thresholds stay positive (>= 1e-6)."""
        del cfg, params, aux, ok, step, threshold_start
        return dict(new, threshold=jnp.maximum(new['threshold'], 1e-6))
