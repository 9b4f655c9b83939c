"""Pruning scores: pure functions of a kernel W [d_in, d_out] and calibration statistics.

Low score = pruned first. Scores are float32 whatever the weight dtype, so that the comparison
between weights does not depend on bf16 rounding.
"""

from __future__ import annotations

import jax.numpy as jnp

from prunesae_jax.errors import InputError


def magnitude_scores(W):
    """|W| in float32. W: [d_in, d_out]."""
    return jnp.abs(jnp.asarray(W, jnp.float32))


def wanda_scores(W, input_sq_norms):
    """Wanda: |W_ij| * ||X_i||_2 with ||X_i||^2 = sum over calibration tokens of x_i^2.

    W: [d_in, d_out] (our kernels are x @ W, so the input feature indexes axis 0);
    input_sq_norms: [d_in], the summed squares of each input feature (calibrate.INPUT_SQ_NORMS).
    Returns [d_in, d_out] float32. Dividing input_sq_norms by the token count (E[x^2] as in the
    paper) scales every score by the same constant and leaves every mask unchanged.
    """
    W = jnp.asarray(W, jnp.float32)
    norms = jnp.asarray(input_sq_norms, jnp.float32)
    if norms.shape != W.shape[:1]:
        raise InputError(f'input_sq_norms has shape {norms.shape}; expected ({W.shape[0]},) for W {W.shape}')
    return jnp.abs(W) * jnp.sqrt(norms)[:, None]
