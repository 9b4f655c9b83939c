"""Greedy decoding without a KV cache: one jit-compiled loop over a fixed-size token buffer.

Each step reruns the decoder over the whole buffer (cheap for the short prompts of the zoo demos
and tests); because attention is causal, the still-empty slots to the right of the current
position cannot influence it, so no attention mask is needed. The buffer length is rounded up
to a multiple of `bucket`, so prompts of nearby lengths share one compilation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from prunesae_jax.errors import InputError
from prunesae_jax.models.config import DecoderConfig
from prunesae_jax.models.decoder import check_token_ids, resid_post, unembed


@functools.partial(jax.jit, static_argnums=0)
def _greedy_loop(cfg: DecoderConfig, params, buf, start, stop):
    """Fills buf[:, start:stop] greedily. buf: [1, S] int32; start, stop: traced int32 scalars."""
    last = cfg.num_layers - 1

    def step(t, buf):
        h = resid_post(cfg, params, buf, layers=(last,))[last]  # [1, S, D]
        h_t = jax.lax.dynamic_slice_in_dim(h, t - 1, 1, axis=1)  # [1, 1, D]: the state predicting slot t
        logits = unembed(cfg, params, h_t)[:, 0]  # [1, V]
        nxt = jnp.argmax(logits, axis=-1).astype(buf.dtype)  # ties -> lowest id, as torch.argmax
        return jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None], t, axis=1)

    return jax.lax.fori_loop(start, stop, step, buf)


def greedy_generate(cfg: DecoderConfig, params: dict, tokens, n_new: int, bucket: int = 32):
    """Greedy continuation: tokens [1, T] int -> [1, T + n_new] int32 (prompt followed by n_new tokens).

    Always produces exactly n_new tokens (no stop at EOS; callers cut at cfg.eos_token_id if they
    want). Compiles once per buffer length round_up(T + n_new, bucket) and config.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] != 1 or tokens.shape[1] < 1:
        raise InputError(f'tokens has shape {tokens.shape}; expected [1, T] with T >= 1')
    if not np.issubdtype(tokens.dtype, np.integer):
        raise InputError(f'tokens has dtype {tokens.dtype}; expected integer token ids')
    check_token_ids(cfg, tokens)
    if isinstance(n_new, bool) or not isinstance(n_new, (int, np.integer)) or n_new < 0:
        raise InputError(f'n_new={n_new!r} must be a non-negative int')
    if isinstance(bucket, bool) or not isinstance(bucket, (int, np.integer)) or bucket < 1:
        raise InputError(f'bucket={bucket!r} must be a positive int')
    T = tokens.shape[1]
    if T + n_new > cfg.max_position_embeddings:
        # every step reruns the whole buffer: a length past the model's context is both meaningless and
        # quadratically slow
        raise InputError(
            f'prompt length {T} + n_new={n_new} exceeds max_position_embeddings='
            f'{cfg.max_position_embeddings}; accepted: T + n_new <= {cfg.max_position_embeddings}'
        )
    size = -(-(T + n_new) // bucket) * bucket
    buf = np.zeros((1, size), np.int32)
    buf[:, :T] = tokens
    out = _greedy_loop(cfg, params, jnp.asarray(buf), jnp.int32(T), jnp.int32(T + n_new))
    return out[:, : T + n_new]


def generate_text(model: str, prompt: str, max_new_tokens: int = 32, dtype: str = 'float32') -> str:
    """Greedy continuation (text after the prompt, cut at EOS) of a zoo model, e.g. 'gemma-3-270m'."""
    from prunesae_jax.models.zoo import load_zoo

    if not isinstance(prompt, str) or not prompt:
        raise InputError(f'prompt={prompt!r} must be a non-empty string')
    cfg, params, tokenizer = load_zoo(model, dtype=dtype)
    tokens = np.asarray([tokenizer(prompt).input_ids], np.int32)
    out = np.asarray(greedy_generate(cfg, params, tokens, max_new_tokens))[0, tokens.shape[1] :]
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, tuple) else (cfg.eos_token_id,)
    stops = [i for i, t in enumerate(out.tolist()) if t in eos]
    return tokenizer.decode(out[: stops[0]] if stops else out, skip_special_tokens=True)
