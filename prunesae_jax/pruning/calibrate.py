"""Calibration statistics for Wanda and SparseGPT, block by block.

Every linear layer of a block reads one of four inputs ("sites"):
  'attn_in'  input_norm(h)                 -> q_proj, k_proj, v_proj   [.., D]
  'o_in'     attention output before o_proj -> o_proj                   [.., H*hd]
  'mlp_in'   pre_mlp_norm(h_mid)            -> gate_proj, up_proj        [.., D]
  'down_in'  act(gate) * up                 -> down_proj                [.., F]
`block_with_inputs` takes them from the decoder's own `block_linear_inputs`. Statistics are sums
over calibration tokens, accumulated in float32 in jit, of one of two kinds:
  INPUT_SQ_NORMS  each input feature's squared norm sum_t x_tj^2 [d_in]  (Wanda's ||X_j||^2)
  INPUT_GRAM      the inputs' Gram matrix X^T X [d_in, d_in]            (SparseGPT's Hessian)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from prunesae_jax.errors import InputError, NonFiniteError
from prunesae_jax.models import decoder as _dec
from prunesae_jax.models.config import DecoderConfig

SITE_OF = {
    'q_proj': 'attn_in',
    'k_proj': 'attn_in',
    'v_proj': 'attn_in',
    'o_proj': 'o_in',
    'gate_proj': 'mlp_in',
    'up_proj': 'mlp_in',
    'down_proj': 'down_in',
}
SITES = ('attn_in', 'o_in', 'mlp_in', 'down_in')
INPUT_SQ_NORMS = 'input_sq_norms'
INPUT_GRAM = 'input_gram'
STATS_KINDS = (INPUT_SQ_NORMS, INPUT_GRAM)
_FIRST_LINEAR_OF_SITE = {'q_proj': 'attn_in', 'o_proj': 'o_in', 'gate_proj': 'mlp_in', 'down_proj': 'down_in'}


def check_calib_tokens(tokens, *, min_len: int = 2) -> np.ndarray:
    """Validates a calibration batch [n_samples, seq_len] of token ids and returns it as int32."""
    if tokens is None:
        raise InputError('calib_tokens is None; Wanda and SparseGPT need a [n_samples, seq_len] int32 token batch')
    a = np.asarray(tokens)
    if a.ndim != 2 or a.shape[0] < 1:
        raise InputError(f'calib_tokens has shape {a.shape}; expected [n_samples >= 1, seq_len] token ids')
    if a.shape[1] < min_len:
        raise InputError(f'calib_tokens seq_len {a.shape[1]} is too short; expected at least {min_len} tokens')
    if not np.issubdtype(a.dtype, np.integer):
        raise InputError(f'calib_tokens has dtype {a.dtype}; expected integer token ids')
    return a.astype(np.int32)


def calibration_batch(
    stream, n_samples: int = 128, seq_len: int = 2048, bos_token_id: int | None = None, seed: int = 0
) -> np.ndarray:
    """[n_samples, seq_len] int32 windows cut from a 1-D token stream (the Wanda reference's recipe).

    Windows start at random offsets (seeded) as the reference samples C4 segments; with a BOS id,
    position 0 of every window is BOS (the data contract). Raises when the stream is empty or too
    short for one window.
    """
    s = np.asarray(stream).reshape(-1)
    n_samples, seq_len = int(n_samples), int(seq_len)
    if n_samples < 1 or seq_len < 2:
        raise InputError(f'n_samples={n_samples}, seq_len={seq_len}; expected n_samples >= 1 and seq_len >= 2')
    body = seq_len - (1 if bos_token_id is not None else 0)
    if s.size == 0:
        raise InputError('calibration token stream is empty; expected at least seq_len tokens')
    if s.size < body:
        raise InputError(
            f'calibration token stream has {s.size} tokens; expected at least {body} for seq_len={seq_len}'
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, s.size - body + 1, size=n_samples)
    out = np.stack([s[a : a + body] for a in starts]).astype(np.int32)
    if bos_token_id is not None:
        out = np.concatenate([np.full((n_samples, 1), bos_token_id, np.int32), out], axis=1)
    return out


def block_with_inputs(cfg: DecoderConfig, layer_params: dict, i: int, h, with_output: bool = True):
    """Block i on h [B,T,D] (no padding) -> (h_out [B,T,D] or None, {site: input [B,T,d_in]}).

    with_output=False skips the down projection and the last residual (the sequential driver
    recomputes the output with the pruned weights anyway).
    """
    out, taps = _dec.block_linear_inputs(cfg, layer_params, i, h, with_output=with_output)
    return out, {site: taps[name] for name, site in _FIRST_LINEAR_OF_SITE.items()}


def init_stats(cfg: DecoderConfig, kind: str) -> dict:
    """Zero statistics for one block: INPUT_SQ_NORMS ([d_in] per site) or INPUT_GRAM ([d_in, d_in])."""
    dims = {
        'attn_in': cfg.hidden_size,
        'o_in': cfg.num_heads * cfg.head_dim,
        'mlp_in': cfg.hidden_size,
        'down_in': cfg.intermediate_size,
    }
    if kind == INPUT_SQ_NORMS:
        return {s: jnp.zeros((d,), jnp.float32) for s, d in dims.items()}
    if kind == INPUT_GRAM:
        return {s: jnp.zeros((d, d), jnp.float32) for s, d in dims.items()}
    raise InputError(f'kind={kind!r} is not valid; accepted: {" | ".join(STATS_KINDS)}')


@functools.partial(jax.jit, static_argnums=(0, 2, 5, 6), donate_argnums=(4,))
def _accumulate(cfg, layer_params, i, h, stats, kind, with_output):
    out, inputs = block_with_inputs(cfg, layer_params, i, h, with_output)
    new = {}
    for site, x in inputs.items():
        x = x.astype(jnp.float32).reshape(-1, x.shape[-1])  # [tokens, d_in]
        if kind == INPUT_SQ_NORMS:
            new[site] = stats[site] + jnp.sum(x * x, axis=0)
        else:
            new[site] = stats[site] + jnp.einsum('td,te->de', x, x, precision=jax.lax.Precision.HIGHEST)
    return out, new


def accumulate_block_stats(
    cfg: DecoderConfig, layer_params: dict, i: int, h, stats: dict, kind: str, with_output: bool = True
):
    """Adds the statistics of block i's inputs on h [B,T,D] to stats; returns (h_out or None, stats)."""
    return _accumulate(cfg, layer_params, _dec.canonical_layer(cfg, i), h, stats, kind, bool(with_output))


def check_stats(stats: dict, i: int, step: int | None = None) -> None:
    """Raises NonFiniteError (stage 'calibration', layer i) when a block's statistics hold NaN / inf.

    step: the calibration batch where the non-finite values first appeared, when the caller knows.
    """
    for site, v in stats.items():
        if not bool(jnp.all(jnp.isfinite(v))):
            raise NonFiniteError(
                f'calibration statistics of input {site!r}',
                stage='calibration',
                layer=int(i),
                step=step,
                detail='check the model weights, dtype and calibration tokens',
            )


def first_nonfinite_batch(cfg: DecoderConfig, layer_params: dict, i: int, hs, kind: str) -> int | None:
    """Index of the first batch of hs whose block-i statistics are non-finite (None if none is).

    Only called once a layer's summed statistics failed `check_stats`, to name the step.
    """
    for b, h in enumerate(hs):
        _, st = accumulate_block_stats(cfg, layer_params, i, h, init_stats(cfg, kind), kind, False)
        if not all(bool(jnp.all(jnp.isfinite(v))) for v in st.values()):
            return b
    return None


def block_out(cfg: DecoderConfig, layer_params: dict, i: int, h):
    """Block i's output for h [B,T,D] (no padding): the decoder's own jitted block."""
    return _dec.block(cfg, layer_params, i, h)
