"""Strided perplexity with the paper's protocol (window 1024, stride 512, BOS on every window).

The text stream (token ids without BOS) is cut like Hugging Face's strided-perplexity recipe:
windows t[begin:begin+window] with begin = 0, stride, 2*stride, ...; each window scores only the
tokens not scored by the previous window (the first window scores all of its tokens), so every
text token is scored exactly once with up to window - stride tokens of context. BOS is prepended
to every window, so the model input is window + 1 tokens and the first text token is predicted
from BOS. Windows are batched; the last, shorter window is right-padded (causal attention makes
the padding invisible to real tokens) and padded positions are not scored.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from prunesae_jax.errors import InputError, NonFiniteError
from prunesae_jax.models import decoder
from prunesae_jax.models.config import DecoderConfig
from prunesae_jax.models.loss import nll_tokens


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise InputError(f'{name}={v!r}; accepted: a positive int')
    return int(v)


def window_spans(n_tokens: int, window: int = 1024, stride: int = 512) -> list[tuple[int, int, int]]:
    """[(begin, end, n_scored)] over a stream of n_tokens; n_scored sums to n_tokens."""
    window, stride = _positive_int('window', window), _positive_int('stride', stride)
    if stride > window:
        raise InputError(f'window={window}, stride={stride}; expected 1 <= stride <= window')
    spans, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        spans.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return spans


def strided_windows(tokens, bos_token_id: int, window: int = 1024, stride: int = 512, pad_id: int = 0):
    """(inputs, targets, weights), each [n_windows, min(window, n_tokens) + 1]: BOS + window,
    next-token targets, 1.0 where a target token is scored.

    A window longer than the text is clamped to the text (stride with it): the one window then covers
    the whole text, exactly as the unclamped window would (the padding it saves is invisible to the
    real tokens), but the model runs on n_tokens + 1 positions instead of window + 1.
    """
    t = np.asarray(tokens)
    if t.dtype.kind not in 'iu':
        raise InputError(f'perplexity tokens have dtype {t.dtype}; expected integer token ids')
    t = t.reshape(-1)
    if t.size < 1:
        raise InputError('perplexity text is empty; expected at least one token')
    if t.min() < 0 or t.max() > np.iinfo(np.int32).max:
        raise InputError(
            f'perplexity tokens hold id {int(t.min() if t.min() < 0 else t.max())}; accepted: 0 <= id < vocab_size'
        )
    t = t.astype(np.int32)
    window, stride = _positive_int('window', window), _positive_int('stride', stride)
    if stride > window:
        raise InputError(f'window={window}, stride={stride}; expected 1 <= stride <= window')
    window = min(window, t.size)
    stride = min(stride, window)
    spans = window_spans(t.size, window, stride)
    T = window + 1
    inputs = np.full((len(spans), T), pad_id, np.int32)
    targets = np.full((len(spans), T), pad_id, np.int32)
    weights = np.zeros((len(spans), T), np.float32)
    for r, (b, e, n) in enumerate(spans):
        L = e - b
        inputs[r, 0] = bos_token_id
        inputs[r, 1 : L + 1] = t[b:e]
        targets[r, :L] = t[b:e]  # logits at position p predict input token p + 1
        weights[r, L - n : L] = 1.0
    return inputs, targets, weights


@functools.partial(jax.jit, static_argnums=(0, 5))
def _window_nll(cfg, params, inputs, targets, weights, rows):
    # inputs/targets/weights: [B, T]; the model runs on T positions, the logits `rows` at a time.
    # Returns the summed NLL of each window [B].
    last = cfg.num_layers - 1
    h = decoder.resid_post(cfg, params, inputs, layers=(last,))[last]  # [B,T,D]
    return jnp.sum(nll_tokens(cfg, params, h, targets, weights, rows), axis=-1)


def _valid_id(cfg: DecoderConfig, v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and 0 <= v < cfg.vocab_size


def _check_ids(cfg: DecoderConfig, tokens, bos, pad) -> int:
    """The text and BOS ids inside the vocabulary (an id past it would read a NaN embedding and be
    reported as a non-finite perplexity; a negative one would wrap around); returns the pad id to use.

    The pad only fills the unscored tail of the last window, so a config pad id outside the vocabulary
    (some configs say -1) is replaced by BOS instead of refused: any real id pads the same.
    """
    if not _valid_id(cfg, bos):
        raise InputError(f'bos_token_id={bos!r}; accepted: an int with 0 <= id < vocab_size={cfg.vocab_size}')
    t = np.asarray(tokens)
    if t.dtype.kind not in 'iu':
        raise InputError(f'perplexity tokens have dtype {t.dtype}; expected integer token ids')
    decoder.check_token_ids(cfg, t, what='perplexity tokens')
    return int(pad) if _valid_id(cfg, pad) else int(bos)


def window_nll(
    cfg: DecoderConfig,
    params: dict,
    tokens,
    *,
    window: int = 1024,
    stride: int = 512,
    batch_size: int = 2,
    bos_token_id: int | None = None,
    chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL in nats [n_windows], scored tokens [n_windows]) of every strided window.

    The per-window sums are what a confidence interval for the perplexity resamples; their totals
    are strided_nll's.
    """
    bos = cfg.bos_token_id if bos_token_id is None else bos_token_id
    if bos is None:
        raise InputError('no BOS id: cfg.bos_token_id is None; pass bos_token_id=<int>')
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else bos
    pad = _check_ids(cfg, tokens, bos, pad)
    batch_size = _positive_int('batch_size', batch_size)  # more than the windows: clamped below
    if chunk is not None:
        chunk = _positive_int('chunk', chunk)  # longer than a window: clamped below
    inputs, targets, weights = strided_windows(tokens, bos, window, stride, pad)
    T = inputs.shape[1]
    n = inputs.shape[0]
    bsz = max(1, min(int(batch_size), n))
    # Logits rows per chunk: chunk positions of every window in the batch, or the memory bound.
    rows = None if chunk is None else bsz * max(1, min(int(chunk), T))
    n_pad = -(-n // bsz) * bsz
    if n_pad != n:  # whole padded windows with zero weight keep one compiled shape
        p = ((0, n_pad - n), (0, 0))
        inputs, targets, weights = np.pad(inputs, p, constant_values=pad), np.pad(targets, p), np.pad(weights, p)
    out = []
    for step, a in enumerate(range(0, n_pad, bsz)):
        nll = np.asarray(
            _window_nll(
                cfg,
                params,
                jnp.asarray(inputs[a : a + bsz]),
                jnp.asarray(targets[a : a + bsz]),
                jnp.asarray(weights[a : a + bsz]),
                rows,
            ),
            np.float64,
        )
        if not np.isfinite(nll).all():  # step = the batch of windows where it went non-finite
            raise NonFiniteError(
                'perplexity NLL', stage='perplexity', step=step, detail=f'windows {a}..{a + bsz - 1} of {n}'
            )
        out.append(nll)
    return np.concatenate(out)[:n], weights[:n].sum(-1).astype(np.int64)


def strided_nll(cfg: DecoderConfig, params: dict, tokens, **protocol) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, number of scored tokens) over a 1-D text stream.

    protocol: window_nll's keyword arguments (window, stride, batch_size, bos_token_id, chunk).
    """
    nll, count = window_nll(cfg, params, tokens, **protocol)
    return float(nll.sum()), int(count.sum())


def perplexity(cfg: DecoderConfig, params: dict, tokens, **protocol) -> float:
    """exp(mean NLL) of a 1-D text token stream (no BOS) under the strided protocol above.

    protocol: window_nll's keyword arguments. batch_size windows run at once; logits are formed
    chunk positions of each window at a time (batch_size * chunk * vocab floats; by default as many
    as fit MAX_LOGITS), which matters for Gemma's 262k vocabulary.
    """
    total, count = strided_nll(cfg, params, tokens, **protocol)
    return math.exp(total / count)


def delta_log_ppl(ppl: float, dense_ppl: float) -> float:
    """log(PPL_pruned) - log(PPL_dense), the paper's damage measure."""
    if not (ppl > 0 and dense_ppl > 0):
        raise InputError(f'perplexities must be positive, got {ppl!r} and {dense_ppl!r}')
    return math.log(ppl) - math.log(dense_ppl)
