"""An SAE's reconstruction spliced into the residual stream, and the next-token losses that follow.

Both the transfer measure (RQ3: CE loss recovered, docs/method.md) and the causal effects (RQ5) run
the decoder's blocks after `layer` on an edited resid_post and score the next tokens with
models/loss.tail_nll. Every position but BOS is edited (BOS activations are outliers no SAE is
trained on); the zero-ablation baseline zeroes the same positions.

    h = sharding.layer_activations(model_cfg, params, rows, layer, batch)   # [B, T, D]
    clean, spliced, zero = transfer_losses(model_cfg, layer, params, h, rows, x_hat, batch)
    loss_fn, codes = causal_loss(model_cfg, layer, params, h, rows, sae_cfg, sae_params)
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from prunesae_jax.models.loss import tail_nll

__all__ = ['encode_batches', 'decode', 'one_seed', 'transfer_losses', 'causal_loss', 'LOGIT_CHUNK']

# Positions per sequence whose logits tail_nll forms at once.
LOGIT_CHUNK = 128


@functools.partial(jax.jit, static_argnums=0)
def _encode(sae_cfg, params, x):
    from prunesae_jax import sae as core  # pylint: disable=g-import-not-at-top  # imported on use only

    return core.encode(sae_cfg, params, x)


@functools.partial(jax.jit, static_argnums=0)
def decode(sae_cfg, params, codes):
    """The dictionary's reconstruction of codes [N, n] -> [N, d] (jitted core.decode)."""
    from prunesae_jax import sae as core  # pylint: disable=g-import-not-at-top

    return core.decode(sae_cfg, params, codes)


def encode_batches(sae_cfg, params, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Codes of activations x [N, d] under one dictionary, batch tokens at a time: [N, n]."""
    return np.concatenate(
        [np.asarray(_encode(sae_cfg, params, jnp.asarray(x[a : a + batch]))) for a in range(0, x.shape[0], batch)]
    )


def one_seed(params: dict, s: int = 0) -> dict:
    """Seed s of SAE params stacked over seeds ([S, ...] leaves), as one dictionary's params."""
    return {k: jnp.asarray(v[s]) for k, v in params.items()}


def transfer_losses(
    model_cfg, layer: int, params, h_all: np.ndarray, rows: np.ndarray, x_hat: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sequence mean next-token NLL [B] each: clean, reconstruction spliced in, zero-ablated.

    h_all [B, T, D]: resid_post of `layer` on rows [B, T] (float32); x_hat [B * (T - 1), D]: the
    reconstruction of every position but BOS. batch_size sequences run at a time, in the params'
    dtype.
    """
    B, T, D = h_all.shape
    chunk = min(LOGIT_CHUNK, T - 1)
    dt = params['embed'].dtype
    losses = {'clean': [], 'spliced': [], 'zero': []}
    for a in range(0, B, batch_size):
        h = jnp.asarray(h_all[a : a + batch_size], dt)
        tk = jnp.asarray(rows[a : a + batch_size])
        xh = jnp.asarray(x_hat.reshape(B, T - 1, D)[a : a + batch_size], dt)
        for what, hh in (('clean', h), ('spliced', h.at[:, 1:].set(xh)), ('zero', h.at[:, 1:].set(0))):
            losses[what].append(np.asarray(tail_nll(model_cfg, layer, chunk, params, hh, tk), np.float64))
    clean, spliced, zero = (np.concatenate(losses[w]) for w in ('clean', 'spliced', 'zero'))
    return clean, spliced, zero


def causal_loss(
    model_cfg, layer: int, params, h: np.ndarray, rows: np.ndarray, sae_cfg, sae_params: dict
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """(loss_fn, codes): the model's mean next-token loss as a function of one dictionary's codes.

    h [B, T, D]: resid_post of `layer` on rows [B, T]; codes [B * (T - 1), n]: the dictionary's
    codes of every position but BOS. loss_fn(codes) decodes them, adds the reconstruction error
    back (so that loss_fn(codes) is the model's own loss) and splices the result in; it is
    jax-traceable, for the gradient x activation and exact-ablation effects of
    analysis.measures.causal.causal_effects.
    """
    from prunesae_jax import sae as core  # pylint: disable=g-import-not-at-top

    h = jnp.asarray(h, params['embed'].dtype)
    rows = jnp.asarray(rows)
    B, T, D = h.shape
    x = h[:, 1:].reshape(-1, D).astype(jnp.float32)
    codes = core.encode(sae_cfg, sae_params, x)
    err = x - core.decode(sae_cfg, sae_params, codes)
    chunk = min(LOGIT_CHUNK, T - 1)

    def loss_fn(c):
        x_new = (core.decode(sae_cfg, sae_params, c) + err).astype(h.dtype).reshape(B, T - 1, D)
        return jnp.mean(tail_nll(model_cfg, layer, chunk, params, h.at[:, 1:].set(x_new), rows))

    return loss_fn, codes
