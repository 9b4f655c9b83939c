"""ReLU SAE with the decoder-norm-weighted L1 penalty (Anthropic, "Towards Monosemanticity" / April 2024
update)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prunesae_jax.sae import common
from prunesae_jax.sae.arch import Architecture, register


@register('relu')
class ReLU(Architecture):
    """z = relu(pre); loss = squared error + l1_coeff * sum_i z_i * |W_dec_i|."""

    def encode(self, cfg, params, pre):
        return jax.nn.relu(pre)

    def loss(self, cfg, params, x, dead, use_aux: bool = True):
        del dead, use_aux  # no AuxK
        z = jax.nn.relu(common.pre_acts(cfg, params, x))
        loss, aux = common.recon_loss(cfg, x, z, common.decode(cfg, params, z))
        w_norm = jnp.linalg.norm(params['W_dec'], axis=-1)
        sparsity = (z * w_norm).sum(-1).mean()
        return loss + cfg.l1_coeff * sparsity, aux
