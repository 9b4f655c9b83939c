"""Plain-autodiff references the SAE library's hand-written code is tested against (test-only).

- `topk_loss`: the TopK loss with AuxK (EleutherAI sparsify's formula) written with dense latents, so
  jax.grad of it is plain autodiff: the reference for arch/topk.py's hand-written gradients;
- `make_optimizer` / `remove_parallel_grad`: optax Adam with the run's schedule and the decoder
  projection, the reference for kernels.adam_apply inside the train step.
"""

import jax
import jax.numpy as jnp
import optax

from prunesae_jax.sae import common, core


def topk_loss(cfg, params, x, dead, use_aux=True):
    """(loss, aux_loss) of one TopK SAE: FVU + aux_coeff * AuxK over the batch's total variance."""
    pre = common.pre_acts(cfg, params, x)
    rows = jnp.arange(x.shape[0])[:, None]
    vals, idx = jax.lax.top_k(pre, cfg.k)
    z = jnp.zeros_like(pre).at[rows, idx].set(jax.nn.relu(vals))
    x_hat = common.decode(cfg, params, z)
    tv = common.total_variance(x)
    loss = ((x - x_hat) ** 2).sum() / tv
    aux_loss = jnp.zeros((), jnp.float32)
    if use_aux:
        a_pre, a_idx = common.auxk_picks(cfg, pre, dead)
        za = jnp.zeros_like(pre).at[rows, a_idx].set(jax.nn.relu(a_pre))
        e = jax.lax.stop_gradient(x - x_hat)
        aux_loss = common.auxk_scale(cfg, dead) * ((za @ params['W_dec'] - e) ** 2).sum() / tv
        loss = loss + cfg.aux_coeff * aux_loss
    return loss, aux_loss


def learning_rate_schedule(sae_cfg, tcfg):
    """The run's schedule as optax builds it: warm-up from lr * 1e-3, flat, linear decay to 0."""
    lr = tcfg.lr if tcfg.lr is not None else core.lr_default(sae_cfg.n_latents)
    warm = max(min(tcfg.warmup_steps, tcfg.n_steps - 1), 0)
    decay = int(tcfg.n_steps * tcfg.decay_frac)
    flat = max(tcfg.n_steps - warm - decay, 0)
    parts = [
        optax.linear_schedule(lr * 1e-3 if warm else lr, lr, max(warm, 1)),
        optax.constant_schedule(lr),
        optax.linear_schedule(lr, 0.0, max(decay, 1)),
    ]
    return optax.join_schedules(parts, [warm, warm + flat])


def make_optimizer(sae_cfg, tcfg):
    """optax Adam with the run's schedule: the reference the fused update in the train step follows."""
    return optax.adam(learning_rate_schedule(sae_cfg, tcfg), b1=tcfg.adam_b1, b2=tcfg.adam_b2)


def remove_parallel_grad(w_dec, g):
    """Drop the gradient component along each unit-norm decoder row (keeps rows on the sphere)."""
    w = common.normalize_decoder(w_dec)
    return g - (g * w).sum(-1, keepdims=True) * w
