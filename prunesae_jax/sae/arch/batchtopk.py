"""BatchTopK SAE (Bussmann et al. 2024; dictionary_learning's BatchTopKTrainer).

Training keeps the k * B largest ReLU'd pre-activations of the whole batch; inference replaces that
batch-wide cut by a per-latent threshold, an EMA of each batch's smallest active pre-activation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prunesae_jax.sae import common, kernels
from prunesae_jax.sae.arch import Architecture, register


@register('batchtopk')
class BatchTopK(Architecture):
    """z = relu(pre) * (pre > threshold) at inference; the batch's top k * B when training."""

    has_threshold = True
    uses_k = True

    def init_extra(self, cfg):
        # < 0 = unset (dictionary_learning): the first update sets it; until then every positive
        # pre-activation passes the inference rule relu(pre) * (pre > threshold)
        return {'threshold': jnp.full((cfg.n_latents,), -1.0, jnp.float32)}

    def encode(self, cfg, params, pre):
        return jax.nn.relu(pre) * (pre > params['threshold'])

    def loss(self, cfg, params, x, dead, use_aux: bool = True):
        """Per-token squared error (common.recon_loss) of the batch-wide top k * B code; aux also holds
        min_active, the batch's smallest active pre-activation (after_update's threshold estimate)."""
        del dead, use_aux  # no AuxK
        pre = common.pre_acts(cfg, params, x)  # [B, n]
        cut = kernels.kth_largest(jax.lax.stop_gradient(jax.nn.relu(pre)), cfg.k * pre.shape[0])
        mask = (pre >= cut) & (pre > 0)
        z = jax.nn.relu(pre) * mask
        min_active = jnp.where(mask, pre, jnp.inf).min()
        loss, aux = common.recon_loss(cfg, x, z, common.decode(cfg, params, z))
        aux['min_active'] = min_active
        return loss, aux

    def after_update(self, cfg, params, new, aux, ok, step, threshold_start):
        """The inference threshold (dictionary_learning): on steps after threshold_start, an EMA with
        cfg.batchtopk_threshold_momentum of the batch's smallest active pre-activation (0 when nothing
        fired); the first update (threshold < 0 = unset) takes the estimate as it is."""
        m = cfg.batchtopk_threshold_momentum
        old = params['threshold'][:, 0]
        est = jnp.where(jnp.isfinite(aux['min_active']), aux['min_active'], 0.0)
        thr = jnp.where(old < 0, est, m * old + (1 - m) * est)
        thr = jnp.where(step > threshold_start, thr, old)
        thr = jnp.broadcast_to(thr[:, None], params['threshold'].shape)
        return dict(new, threshold=jnp.where(ok[:, None], thr, params['threshold']))
