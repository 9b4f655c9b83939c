"""One SAE as a function of its config: init, encode, reconstruct, evaluate, train_loss.

Every function here works on the params of ONE SAE (no seed axis; init excepted, which makes S seeds);
training maps them over the leading seed axis S. What differs between architectures comes from the
registry (prunesae_jax/sae/arch/), the shared maths from prunesae_jax/sae/common.py. Names and shapes
follow SAELens: W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in], threshold [n].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from prunesae_jax.errors import InputError
from prunesae_jax.sae import arch, common
from prunesae_jax.sae.config import SAEConfig

# ----------------------------------------------------------------------------- init


@functools.partial(jax.jit, static_argnames=('n_iter',))
def geometric_median(x, n_iter: int = 100, eps: float = 1e-8):
    """Weiszfeld's algorithm: the point minimising the summed L2 distance to the rows of x [N, d]."""
    x = jnp.asarray(x, jnp.float32)

    def body(_, m):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - m, axis=-1), eps)  # [N]
        return (w[:, None] * x).sum(0) / w.sum()

    return jax.lax.fori_loop(0, n_iter, body, x.mean(0))


def _init_decoder_one(key, cfg: SAEConfig):
    w_dec = jax.random.normal(key, (cfg.n_latents, cfg.d_in), jnp.float32)
    return w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)  # unit-norm rows


def _init_one(key, cfg: SAEConfig, b_dec):
    w_dec = _init_decoder_one(key, cfg)
    p = {
        'W_enc': w_dec.T,  # tied init
        'b_enc': jnp.zeros((cfg.n_latents,), jnp.float32),
        'W_dec': w_dec,
        'b_dec': b_dec,
    }
    p.update(arch.get(cfg.architecture).init_extra(cfg))
    return p


def init(keys, cfg: SAEConfig, sample=None):
    """Params with a leading seed axis S from keys [S] (typed keys or uint32 [S, 2]).

    Tied init, unit-norm decoder rows; b_dec = geometric median of `sample` [N, d_in]
    (the same for every seed, so seeds differ only in their random directions).
    """
    if sample is not None:
        sample = jnp.asarray(sample, jnp.float32)
        if sample.ndim != 2 or sample.shape[1] != cfg.d_in:
            raise InputError(f'sample shape {tuple(sample.shape)}; expected [N, d_in={cfg.d_in}]')
        b_dec = geometric_median(sample)
    else:
        b_dec = jnp.zeros((cfg.d_in,), jnp.float32)
    return _init_fn(cfg)(keys, b_dec)


@functools.lru_cache(maxsize=16)
def _init_fn(cfg):
    return jax.jit(jax.vmap(lambda k, b: _init_one(k, cfg, b), in_axes=(0, None)))


def init_decoder(keys, cfg: SAEConfig):
    """The unit-norm decoder rows [S, n, d_in] that init(keys, cfg) starts from (without the rest)."""
    return _init_decoder_fn(cfg)(keys)


@functools.lru_cache(maxsize=16)
def _init_decoder_fn(cfg):
    return jax.jit(jax.vmap(lambda k: _init_decoder_one(k, cfg)))


# ----------------------------------------------------------------------------- forward


def encode(cfg: SAEConfig, params, x):
    """Latent activations z [B, n] (dense array; inference rules, not the training ones)."""
    x = jnp.asarray(x, jnp.float32)
    common.check_d_in(cfg, x)
    return arch.get(cfg.architecture).encode(cfg, params, common.pre_acts(cfg, params, x))


def reconstruct(cfg: SAEConfig, params, x):
    """x_hat [B, d_in] with the inference encoder."""
    return arch.get(cfg.architecture).reconstruct(cfg, params, jnp.asarray(x, jnp.float32))


def evaluate(cfg: SAEConfig, params, x):
    """Per-SAE metrics on x [B, d_in]: mse, fvu, l0, dead_frac (never fired in x), firing_rate [n]."""
    x = jnp.asarray(x, jnp.float32)
    common.check_d_in(cfg, x)
    z = encode(cfg, params, x)
    x_hat = common.decode(cfg, params, z)
    fired = z != 0
    rate = fired.mean(0)
    return {
        'mse': ((x - x_hat) ** 2).mean(),
        'fvu': common.fvu(x, x_hat),
        'l0': fired.sum(-1).mean(),
        'dead_frac': (rate == 0).mean(),
        'firing_rate': rate,
    }


def train_loss(cfg: SAEConfig, params, x, dead, use_aux: bool = True):
    """Training loss and metrics of one SAE on a batch x [B, d_in]; dead [n] bool marks dead latents.

    The architecture's loss (prunesae_jax/sae/arch/; docs/method.md). Returns (loss, aux) where aux
    holds mse (mean squared error per element), l0, fire_count [n] (tokens that fired it), x_hat,
    aux_loss (TopK) and, for batchtopk, min_active (the threshold estimate). use_aux=False skips AuxK
    (the caller knows no latent is dead).
    """
    return arch.get(cfg.architecture).loss(cfg, params, x, dead, use_aux)


# ----------------------------------------------------------------------------- units


def lr_default(n_latents: int) -> float:
    """2e-4 / sqrt(n_latents / 2^14) (OpenAI TopK scaling law)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def fold_scale(params, scale):
    """Params trained on x * scale -> params acting on raw x (exact reparametrisation).

    pre = (x*c - b_dec) W_enc + b_enc = (x - b_dec/c)(c W_enc) + b_enc ; x_hat = (z W_dec + b_dec) / c
    """
    out = dict(params)
    c = jnp.asarray(scale, jnp.float32)
    out['W_enc'] = params['W_enc'] * c
    out['W_dec'] = params['W_dec'] / c
    out['b_dec'] = params['b_dec'] / c
    return out
