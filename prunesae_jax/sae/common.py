"""The SAE maths every architecture shares: pre-activations, decode, FVU, the decoder's unit-norm rows and
the AuxK term's picks and weight.

Functions work on the params of ONE SAE (no seed axis); names and shapes follow SAELens:
W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in], threshold [n]. The architectures
(prunesae_jax/sae/arch/) import this module; nothing here depends on which architecture runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prunesae_jax.errors import InputError


def check_d_in(cfg, x) -> None:
    """InputError unless the activations x [..., d] have the SAE's d_in."""
    if x.shape[-1] != cfg.d_in:
        raise InputError(f'activations have d_in={x.shape[-1]}; this SAE expects d_in={cfg.d_in}')


def pre_acts(cfg, params, x):
    """Encoder pre-activations [B, n]."""
    if cfg.apply_b_dec_to_input:
        x = x - params['b_dec']
    return x @ params['W_enc'] + params['b_enc']


def decode(cfg, params, z):
    """x_hat [B, d_in] from dense latents z [B, n]."""
    return z @ params['W_dec'] + params['b_dec']


def fvu(x, x_hat):
    """Fraction of variance unexplained, around the mean of x (not around zero).

    The one FVU of the package: the training metrics, sae.evaluate and the analysis use it.
    """
    x = jnp.asarray(x, jnp.float32)
    x_hat = jnp.asarray(x_hat, jnp.float32)
    resid = ((x - x_hat) ** 2).sum()
    total = ((x - x.mean(0)) ** 2).sum()
    return resid / jnp.maximum(total, 1e-30)


def total_variance(x):
    """Summed squared deviation of the batch x [B, d] from its mean: the denominator of the TopK losses."""
    return jnp.maximum(((x - x.mean(0)) ** 2).sum(), 1e-30)


def normalize_decoder(w_dec):
    """Decoder rows [n, d] scaled to unit norm."""
    return w_dec / jnp.maximum(jnp.linalg.norm(w_dec, axis=-1, keepdims=True), 1e-12)


def recon_loss(cfg, x, z, x_hat):
    """The per-token squared-error loss of a dense code z [B, n] (relu, jumprelu, batchtopk).

    Returns (loss, aux): loss = squared error summed over d_in and averaged over tokens (the
    Anthropic / Gemma Scope / dictionary_learning convention); aux holds mse (mean squared error per
    element), l0, fire_count [n] (tokens that fired each latent) and x_hat.
    """
    sq = ((x - x_hat) ** 2).sum()
    aux = {
        'mse': sq / (x.shape[0] * cfg.d_in),
        'l0': (z != 0).sum(-1).mean(),
        'fire_count': (z != 0).sum(0).astype(jnp.int32),
        'x_hat': x_hat,
    }
    return sq / x.shape[0], aux


# ----------------------------------------------------------------------------- AuxK


def auxk_scale(cfg, dead):
    """min(num_dead / k_aux, 1): sparsify damps AuxK while fewer latents are dead than it could use."""
    return jnp.minimum(dead.sum().astype(jnp.float32) / cfg.k_aux_eff, 1.0)


def auxk_picks(cfg, pre, dead):
    """The k_aux largest pre-activations of DEAD latents and their indices [B, k_aux]. With fewer dead
    latents than k_aux the extra picks get pre-activation 0, i.e. add nothing (sparsify's
    k_aux = min(k_aux, num_dead))."""
    a_top, a_idx = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), cfg.k_aux_eff)
    return jnp.where(jnp.isfinite(a_top), a_top, 0.0), a_idx
