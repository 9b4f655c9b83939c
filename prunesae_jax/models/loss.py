"""Next-token losses of the decoder: NLL from a hidden state, in capped logit chunks.

Used by the perplexity protocol (pruning/perplexity.py) and by the measures that splice an SAE
reconstruction into the residual stream (analysis): both score next tokens from the last block's
output without ever holding more than MAX_LOGITS float32 logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from prunesae_jax.models import decoder
from prunesae_jax.models.config import DecoderConfig

__all__ = ['MAX_LOGITS', 'chunk_rows', 'nll_tokens', 'nll_sum', 'tail_nll']


# Gemma's 262k vocabulary. Full-vocabulary logits are the largest arrays of the study; bounding
# them keeps the peak memory independent of batch size and sequence length.
MAX_LOGITS = 2**26


def chunk_rows(n_rows: int, vocab_size: int, max_logits: int = MAX_LOGITS) -> int:
    """Rows per logits chunk: at most max_logits // vocab_size, balanced so padding is < 1 chunk."""
    cap = max(1, min(int(n_rows), int(max_logits) // int(vocab_size)))
    n_chunks = -(-int(n_rows) // cap)
    return -(-int(n_rows) // n_chunks)


def nll_tokens(cfg: DecoderConfig, params: dict, h, targets, weights, rows: int | None = None):
    """weights * next-token NLL of every position, shaped like `targets` (traceable).

    h [..., D] is the last block's output, targets / weights [...] like h without D. Tokens are
    flattened and unembedded `rows` at a time (default: chunk_rows, <= MAX_LOGITS logit entries),
    so at most one [rows, vocab] float32 block of logits exists at once; the chunk body is
    rematerialised under jax.grad, so the backward pass holds one chunk too.
    """
    D = h.shape[-1]
    shape = targets.shape
    h = h.reshape(-1, D)
    t = targets.reshape(-1)
    w = weights.reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    r = chunk_rows(n, cfg.vocab_size) if rows is None else max(1, min(int(rows), n))
    n_chunks = -(-n // r)
    pad = n_chunks * r - n
    if pad:  # zero-weight rows: scored nowhere
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t = jnp.pad(t, (0, pad))
        w = jnp.pad(w, (0, pad))

    @jax.checkpoint  # never keep a chunk's logits for the backward pass
    def one(args):
        hh, tt, ww = args
        logits = decoder.unembed(cfg, params, hh[None])[0]  # [r, V] float32
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tt[:, None], axis=-1)[:, 0]
        return (lse - tgt) * ww

    per = jax.lax.map(one, (h.reshape(n_chunks, r, D), t.reshape(n_chunks, r), w.reshape(n_chunks, r)))
    return per.reshape(-1)[:n].reshape(shape)


def nll_sum(cfg: DecoderConfig, params: dict, h, targets, weights, rows: int | None = None):
    """Sum of weights * next-token NLL from the last block's output h [..., D] (traceable; see
    nll_tokens for the memory bound)."""
    return jnp.sum(nll_tokens(cfg, params, h, targets, weights, rows))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def tail_nll(cfg, layer: int, chunk: int, params, h, tokens):
    """Mean next-token NLL of each row [B] when blocks layer+1.. run on h [B,T,D] (the resid_post
    of `layer`).

    Logits are formed at most B * chunk positions (and MAX_LOGITS entries) at a time,
    forward and backward, so their memory does not grow with B or T.
    """
    for i in range(layer + 1, cfg.num_layers):
        h = decoder.block(cfg, params['layers'][i], i, h)
    B, T, _ = h.shape
    n = T - 1
    rows = chunk_rows(B * n, cfg.vocab_size, min(MAX_LOGITS, B * chunk * cfg.vocab_size))
    w = jnp.ones((B, n), jnp.float32)
    return jnp.sum(nll_tokens(cfg, params, h[:, :-1], tokens[:, 1:], w, rows), axis=-1) / n
