"""One decoder for Llama 3.x, Gemma 2 and Gemma 3 (text): pure functions over a params dict.

The params are a nested dict (its layout is in models/convert.py): {'embed': [V, D],
'final_norm': [D], 'layers': [{name: array} per block, names from `layer_param_names`],
'lm_head': [D, V] unless the embeddings are tied}. Public: `init_params`, `forward`,
`resid_post`, `embed`, `block`, `block_linear_inputs`, `unembed`. Every family difference is a
field of `DecoderConfig` (models/config.py); the code below branches on those switches only,
never on the family name.

Numerics follow the Hugging Face reference: RMSNorm in float32 (norm_plus_one: x * (1 + w) in
float32 then cast; else cast then w * x), RoPE cos/sin cast to the activation dtype, attention
logits and softmax in float32, scaled embeddings multiplied by sqrt(D) rounded to the
activation dtype.

Padding: attention_mask is [B, T] with 1 = real token. Padded keys are never attended to and
positions are counted over real tokens only (cumsum(mask) - 1, as HF `generate` does), so a
left-padded row gives the same outputs at its real tokens as the unpadded sequence.
Outputs at padded positions are finite but meaningless.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from prunesae_jax.errors import InputError
from prunesae_jax.models.config import DecoderConfig

_INIT_STD = 0.02


def layer_param_names(cfg: DecoderConfig) -> tuple[str, ...]:
    """The keys of params['layers'][i] for this config."""
    names = ['input_norm', 'pre_mlp_norm']
    if cfg.post_norms:
        names += ['post_attn_norm', 'post_mlp_norm']
    if cfg.qk_norm:
        names += ['q_norm', 'k_norm']
    names += ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
    return tuple(names)


def layer_param_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every entry of params['layers'][i]."""
    D, F, H, KV, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {
        'input_norm': (D,),
        'pre_mlp_norm': (D,),
        'post_attn_norm': (D,),
        'post_mlp_norm': (D,),
        'q_norm': (hd,),
        'k_norm': (hd,),
        'q_proj': (D, H * hd),
        'k_proj': (D, KV * hd),
        'v_proj': (D, KV * hd),
        'o_proj': (H * hd, D),
        'gate_proj': (D, F),
        'up_proj': (D, F),
        'down_proj': (F, D),
    }
    return {k: shapes[k] for k in layer_param_names(cfg)}


# --------------------------------------------------------------------------- the block


def _rms_norm(cfg: DecoderConfig, w, x):
    """RMSNorm over the last axis in float32; norm_plus_one scales by (1 + w) in float32, else by w
    after casting back to x.dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    if cfg.norm_plus_one:
        return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return (w * xf.astype(x.dtype)).astype(x.dtype)


def _rotate(x, cos, sin):
    """x * cos + rotate_half(x) * sin (HF's convention: halves, not interleaved pairs); x [..., hd].

    rotate_half(x) = [-x2, x1] is written as the two halves swapped (a reverse over an axis of
    size 2) times [-sin, sin]: elementwise ops XLA fuses into one pass over x, where slicing and
    concatenating left several full-size temporaries. Negation is exact, so the numbers are the same.
    """
    half = x.shape[-1] // 2
    swapped = jnp.flip(x.reshape(*x.shape[:-1], 2, half), axis=-2).reshape(x.shape)
    sign = jnp.concatenate([-jnp.ones((half,), sin.dtype), jnp.ones((half,), sin.dtype)])
    return x * cos + swapped * (sin * sign)


# Queries per attention chunk. Causal (and sliding-window) attention skips the key blocks a chunk
# cannot see; sequences up to this length run as one chunk.
_Q_CHUNK = 128


def _chunk_mask(t0: int, t1: int, s0: int, window: int | None, key_ok):
    """allowed [B or 1, t1-t0, t1-s0] bool for queries t0..t1-1 against keys s0..t1-1, built from iotas."""
    q_idx = jnp.arange(t0, t1)[:, None]
    kv_idx = jnp.arange(s0, t1)[None, :]
    allowed = kv_idx <= q_idx
    if window is not None:
        allowed = allowed & (kv_idx > q_idx - window)
    allowed = allowed[None]
    if key_ok is not None:
        allowed = allowed & key_ok[:, None, s0:t1]
    return allowed


def _attention(cfg: DecoderConfig, lp: dict, x, cos, sin, key_ok, window):
    """Grouped-query attention output before o_proj [B,T,H*hd] (RoPE, optional QK-norm and soft-capping).

    x [B,T,D], lp the block's params, cos/sin [B,T,hd], key_ok [B,T] bool (False = padding key) or
    None, window: the sliding window in tokens or None (full causal attention).

    Layout: heads sharing a K/V head are laid out as [B, KV, T*G, hd] (query heads h = kv * G + g,
    HF's repeat_kv order), so QK^T and PV are plain batched GEMMs over (B, KV) with the softmax
    over the contiguous last axis; for KV = 1 (Gemma 3 270M) no activation is transposed at all.
    Queries run in chunks of _Q_CHUNK; each chunk only meets the keys it may attend to.
    """
    B, T, _ = x.shape
    KV, hd = cfg.num_kv_heads, cfg.head_dim
    G = cfg.num_heads // KV
    q = (x @ lp['q_proj']).reshape(B, T, KV, G, hd)
    k = (x @ lp['k_proj']).reshape(B, T, KV, hd)
    v = (x @ lp['v_proj']).reshape(B, T, KV, hd)
    if cfg.qk_norm:
        q = _rms_norm(cfg, lp['q_norm'], q)
        k = _rms_norm(cfg, lp['k_norm'], k)
    q = _rotate(q, cos[:, :, None, None, :], sin[:, :, None, None, :])
    k = _rotate(k, cos[:, :, None, :], sin[:, :, None, :])
    q = q.transpose(0, 2, 1, 3, 4).reshape(B, KV, T * G, hd)
    k = k.transpose(0, 2, 1, 3)  # [B,KV,S,hd]
    v = v.transpose(0, 2, 1, 3)
    outs = []
    for t0 in range(0, T, _Q_CHUNK):
        t1 = min(t0 + _Q_CHUNK, T)
        s0 = 0 if window is None else max(0, t0 - window + 1)
        scores = jnp.einsum(
            'bkqd,bksd->bkqs', q[:, :, t0 * G : t1 * G], k[:, :, s0:t1], preferred_element_type=jnp.float32
        )
        scores = scores * cfg.attn_scale
        if cfg.attn_logit_softcapping:
            cap = cfg.attn_logit_softcapping
            scores = jnp.tanh(scores / cap) * cap
        scores = scores.reshape(B, KV, t1 - t0, G, t1 - s0)
        allowed = _chunk_mask(t0, t1, s0, window, key_ok)[:, None, :, None, :]
        # A finite fill keeps fully masked (padding) query rows finite instead of NaN.
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype).reshape(B, KV, (t1 - t0) * G, t1 - s0)
        outs.append(jnp.einsum('bkqs,bksd->bkqd', probs, v[:, :, s0:t1]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)  # [B,KV,T*G,hd]
    return out.reshape(B, KV, T, G * hd).transpose(0, 2, 1, 3).reshape(B, T, KV * G * hd)


def _mlp_hidden(cfg: DecoderConfig, lp: dict, x):
    """act(gate(x)) * up(x) [B,T,F], the input of down_proj (SiLU or tanh-GELU, cfg.hidden_act)."""
    g = x @ lp['gate_proj']
    g = jax.nn.silu(g) if cfg.hidden_act == 'silu' else jax.nn.gelu(g, approximate=True)
    return g * (x @ lp['up_proj'])


def _post_norm(cfg: DecoderConfig, lp: dict, name: str, x):
    """A sublayer's output before the residual add: normalised by lp[name] when cfg.post_norms."""
    return _rms_norm(cfg, lp[name], x) if cfg.post_norms else x


def _block_apply(cfg: DecoderConfig, lp: dict, h, cos, sin, key_ok, window, with_output: bool = True):
    """One pre-norm residual block: (h_out or None, {name: input of that prunable linear layer}).

    h + attn(norm(h)), then + mlp(norm(h)); post_norms normalise each sublayer's output before the
    add. The taps are intermediates the output needs anyway, so a caller that drops them traces
    the same ops. with_output=False stops before down_proj: block-sequential pruning recomputes
    the output with the pruned weights anyway.
    """
    attn_in = _rms_norm(cfg, lp['input_norm'], h)
    o_in = _attention(cfg, lp, attn_in, cos, sin, key_ok, window)
    h = h + _post_norm(cfg, lp, 'post_attn_norm', o_in @ lp['o_proj'])
    mlp_in = _rms_norm(cfg, lp['pre_mlp_norm'], h)
    down_in = _mlp_hidden(cfg, lp, mlp_in)
    taps = {
        'q_proj': attn_in,
        'k_proj': attn_in,
        'v_proj': attn_in,
        'o_proj': o_in,
        'gate_proj': mlp_in,
        'up_proj': mlp_in,
        'down_proj': down_in,
    }
    if not with_output:
        return None, taps
    return h + _post_norm(cfg, lp, 'post_mlp_norm', down_in @ lp['down_proj']), taps


# --------------------------------------------------------------------------- positions


def _inv_freq(cfg: DecoderConfig, base: float, scaling: dict | None) -> np.ndarray:
    """RoPE inverse frequencies [hd/2] in float32, with HF's 'linear' and 'llama3' scalings."""
    hd = cfg.head_dim
    inv = (1.0 / (np.float32(base) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(np.float32)
    if not scaling or scaling.get('rope_type', 'default') == 'default':
        return inv
    factor = float(scaling['factor'])
    if scaling['rope_type'] == 'linear':
        return (inv / np.float32(factor)).astype(np.float32)
    low, high = float(scaling['low_freq_factor']), float(scaling['high_freq_factor'])
    old_len = float(scaling.get('original_max_position_embeddings', cfg.max_position_embeddings))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = (2 * math.pi / inv).astype(np.float32)
    out = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * out / np.float32(factor) + smooth * out).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, out).astype(np.float32)


def _rope(cfg: DecoderConfig, layer: int, positions, dtype):
    """cos, sin [B,T,hd] for a layer, in the activation dtype as the reference does."""
    base, scaling = cfg.rope_for_layer(layer)
    inv = jnp.asarray(_inv_freq(cfg, base, scaling))
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B,T,hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _positions_and_keys(attention_mask, B: int, T: int):
    """positions [B,T] int32 and key_ok [B,T] bool (None without an attention_mask: every key is real)."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), None
    key_ok = attention_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(key_ok.astype(jnp.int32), axis=-1) - 1, 0)
    return positions, key_ok


def _window(cfg: DecoderConfig, layer: int) -> int | None:
    """Sliding window of a layer in tokens, or None for full causal attention."""
    return cfg.sliding_window if cfg.layer_types[layer] == 'sliding_attention' else None


# --------------------------------------------------------------------------- the model


def _check_depth(cfg: DecoderConfig, params: dict) -> None:
    if len(params['layers']) != cfg.num_layers:
        raise InputError(f'params has {len(params["layers"])} layers; config says num_layers={cfg.num_layers}')


def _embed_tokens(cfg: DecoderConfig, params: dict, tokens):
    """Token embeddings [B,T,D]; scale_embeddings multiplies by sqrt(D) rounded to the activation dtype
    first, as the reference does."""
    h = jnp.take(params['embed'], tokens, axis=0)
    if cfg.scale_embeddings:
        h = h * jnp.asarray(math.sqrt(cfg.hidden_size), h.dtype)
    return h


def _run_layers(cfg: DecoderConfig, params: dict, h, attention_mask, stop_after: int, capture: tuple[int, ...]):
    """Runs blocks 0..stop_after; returns (h, {l: resid_post_l for l in capture}).

    cos/sin are computed once per distinct RoPE (base, scaling) and shared by the layers that use it.
    """
    B, T, _ = h.shape
    positions, key_ok = _positions_and_keys(attention_mask, B, T)
    ropes = {}
    out = {}
    for i in range(stop_after + 1):
        key = cfg.rope_for_layer(i)
        key = (key[0], tuple(sorted(key[1].items())) if key[1] else None)
        if key not in ropes:
            ropes[key] = _rope(cfg, i, positions, h.dtype)
        cos, sin = ropes[key]
        h, _ = _block_apply(cfg, params['layers'][i], h, cos, sin, key_ok, _window(cfg, i))
        if i in capture:
            out[i] = h
    return h, out


def _logits(cfg: DecoderConfig, params: dict, h):
    """Final norm, head (tied: embed.T, else lm_head) with float32 accumulation, final soft-capping."""
    h = _rms_norm(cfg, params['final_norm'], h)
    w = params['embed'].T if cfg.tie_word_embeddings else params['lm_head']
    logits = jnp.matmul(h, w, preferred_element_type=jnp.float32)
    if cfg.final_logit_softcapping:
        cap = cfg.final_logit_softcapping
        logits = jnp.tanh(logits / cap) * cap
    return logits


# --------------------------------------------------------------------------- input checks


def _host_values(x):
    """x as a numpy array when its values are available without running anything, else None.

    numpy arrays and lists as they are; a concrete, fully addressable jax array by a device-to-host copy
    of its (small) buffer, which waits for that buffer only, never for the queued computations; a tracer
    (a call inside jit, e.g. greedy_generate's loop or sharding's pinned blocks) has no values.
    """
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array):
        return np.asarray(x) if x.is_fully_addressable else None
    return np.asarray(x)


def check_token_ids(cfg: DecoderConfig, tokens, what: str = 'tokens') -> None:
    """InputError unless every id of `tokens` (any shape, integer dtype) lies in 0 <= id < cfg.vocab_size.

    An id past the vocabulary would be read by jnp.take as NaN (and reported much later as a non-finite
    perplexity or loss), a negative one would wrap around to the end of the vocabulary. Checked on the
    host values; traced tokens (inside jit) are skipped.
    """
    dtype = getattr(tokens, 'dtype', None)
    dtype = np.dtype(dtype) if dtype is not None else np.asarray(tokens).dtype
    if dtype.kind not in 'iu':
        raise InputError(f'{what} has dtype {dtype}; expected integer token ids (int32)')
    host = _host_values(tokens)
    if host is None or host.size == 0:
        return
    lo, hi = host.min(), host.max()
    if lo < 0 or hi >= cfg.vocab_size:
        bad = np.argwhere((host < 0) | (host >= cfg.vocab_size))[0]
        raise InputError(
            f'{what} holds token id {int(host[tuple(bad)])} at index {tuple(int(i) for i in bad)}; '
            f'accepted: 0 <= id < vocab_size={cfg.vocab_size}'
        )


def _check_tokens(cfg: DecoderConfig, tokens, attention_mask=None):
    """Shape [B, T], integer ids inside the vocabulary, and a mask of the same shape (host-side checks)."""
    if not hasattr(tokens, 'ndim'):
        tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise InputError(f'tokens has shape {getattr(tokens, "shape", None)}; expected [B, T] int32')
    check_token_ids(cfg, tokens)
    if attention_mask is not None and tuple(np.shape(attention_mask)) != tuple(tokens.shape):
        raise InputError(
            f'attention_mask has shape {tuple(np.shape(attention_mask))}; expected the shape of tokens '
            f'{tuple(tokens.shape)}'
        )
    return tokens


# --------------------------------------------------------------------------- public API


def init_params(cfg: DecoderConfig, seed: int) -> dict:
    """Random params (normal(0, 0.02) weights, identity norms) in cfg.dtype; same seed, same numbers.

    The n-th weight drawn (embed, then q, k, v, o, gate, up, down of each block, then lm_head)
    uses fold_in(key(seed), n). Identity norms are w = 0 with norm_plus_one, else w = 1.
    """
    dt = jnp.dtype(cfg.dtype)
    key = jax.random.key(seed)
    draws = itertools.count()

    def normal(*shape):
        k = jax.random.fold_in(key, next(draws))
        return (_INIT_STD * jax.random.normal(k, shape, jnp.float32)).astype(dt)

    def norm(dim):
        return jnp.zeros((dim,), dt) if cfg.norm_plus_one else jnp.ones((dim,), dt)

    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = layer_param_shapes(cfg)
    params = {'embed': normal(V, D)}
    layers = []
    for _ in range(cfg.num_layers):
        lp = {
            'q_proj': normal(D, H * hd),
            'k_proj': normal(D, KV * hd),
            'v_proj': normal(D, KV * hd),
            'o_proj': normal(H * hd, D),
            'gate_proj': normal(D, F),
            'up_proj': normal(D, F),
            'down_proj': normal(F, D),
        }
        layers.append({n: lp[n] if n in lp else norm(shapes[n][0]) for n in layer_param_names(cfg)})
    params['final_norm'] = norm(D)
    params['layers'] = layers
    if not cfg.tie_word_embeddings:
        params['lm_head'] = normal(D, V)
    return params


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, attention_mask):
    _check_depth(cfg, params)
    h = _embed_tokens(cfg, params, tokens)
    h, _ = _run_layers(cfg, params, h, attention_mask, cfg.num_layers - 1, ())
    return _logits(cfg, params, h)


def forward(cfg: DecoderConfig, params: dict, tokens, attention_mask=None):
    """Logits [B,T,V] float32 for tokens [B,T] int32 (attention_mask [B,T], 1 = real token)."""
    tokens = _check_tokens(cfg, tokens, attention_mask)
    return _forward(cfg, params, tokens, attention_mask)


def check_layers(cfg: DecoderConfig, layers) -> tuple[int, ...]:
    """Validates layer indices (0..L-1, negatives count from the end); returns them sorted, unique."""
    if layers is None:
        return tuple(range(cfg.num_layers))
    if isinstance(layers, (int, np.integer)):
        layers = (layers,)
    out = []
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, (int, np.integer)) or not -cfg.num_layers <= l < cfg.num_layers:
            raise InputError(f'layer index {l!r} is out of range; expected an int in [0, {cfg.num_layers - 1}]')
        out.append(int(l) % cfg.num_layers)
    if not out:
        raise InputError('layers=() is empty; expected at least one layer index')
    return tuple(sorted(set(out)))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _resid_post(cfg, params, tokens, attention_mask, layers):
    _check_depth(cfg, params)
    h = _embed_tokens(cfg, params, tokens)
    _, out = _run_layers(cfg, params, h, attention_mask, max(layers), layers)
    return out


def resid_post(cfg: DecoderConfig, params: dict, tokens, attention_mask=None, layers=None) -> dict:
    """Residual stream after each requested block, {l: [B,T,D]} (l = HF hidden_states[l+1]).

    Runs blocks 0..max(layers) only; later blocks and the unembedding are never computed.
    layers=None captures every layer. Traceable: inside jit (traced tokens) the host-side token
    checks are skipped, so a jitted loss or loop calls it like any other function.
    """
    tokens = _check_tokens(cfg, tokens, attention_mask)
    layers = check_layers(cfg, layers)
    return _resid_post(cfg, params, tokens, attention_mask, layers)


@functools.partial(jax.jit, static_argnums=0)
def _embed(cfg, params, tokens):
    _check_depth(cfg, params)
    return _embed_tokens(cfg, params, tokens)


def embed(cfg: DecoderConfig, params: dict, tokens):
    """Input to block 0: token embeddings [B,T,D] (scale_embeddings: times sqrt(D) in the activation dtype)."""
    tokens = _check_tokens(cfg, tokens)
    return _embed(cfg, params, tokens)


def canonical_layer(cfg: DecoderConfig, i: int) -> int:
    """The first layer computed exactly like layer i (same attention type and RoPE).

    Blocks differ only by these, so jitting with the canonical index compiles once per kind of
    layer instead of once per layer.
    """

    def kind(j):
        base, scaling = cfg.rope_for_layer(j)
        return cfg.layer_types[j], base, tuple(sorted(scaling.items())) if scaling else None

    return next(j for j in range(cfg.num_layers) if kind(j) == kind(i))


@functools.partial(jax.jit, static_argnums=(0, 2, 5))
def _block(cfg, layer_params, i, h, attention_mask, inputs):
    # inputs: None -> output only; 'with_output' / 'only' -> linear-layer inputs too / alone.
    B, T, _ = h.shape
    positions, key_ok = _positions_and_keys(attention_mask, B, T)
    cos, sin = _rope(cfg, i, positions, h.dtype)
    window = _window(cfg, i)
    if inputs is None:
        return _block_apply(cfg, layer_params, h, cos, sin, key_ok, window)[0]
    return _block_apply(cfg, layer_params, h, cos, sin, key_ok, window, with_output=inputs == 'with_output')


def block(cfg: DecoderConfig, layer_params: dict, i: int, h, attention_mask=None):
    """Applies decoder block i (its params = params['layers'][i]) to h [B,T,D]; returns [B,T,D]."""
    (i,) = check_layers(cfg, (i,))
    return _block(cfg, layer_params, canonical_layer(cfg, i), h, attention_mask, None)


def block_linear_inputs(
    cfg: DecoderConfig, layer_params: dict, i: int, h, attention_mask=None, with_output: bool = True
):
    """Like `block`, also returning the input of each prunable linear layer (for Wanda statistics).

    Returns (h_out [B,T,D] or None when with_output=False, {name: x [B,T,d_in] for name in
    PRUNABLE}); q/k/v share one input, as do gate/up. o_proj sees the attention output
    [B,T,H*hd], down_proj act(gate) * up [B,T,F].
    """
    (i,) = check_layers(cfg, (i,))
    mode = 'with_output' if with_output else 'only'
    return _block(cfg, layer_params, canonical_layer(cfg, i), h, attention_mask, mode)


@functools.partial(jax.jit, static_argnums=0)
def _unembed(cfg, params, h):
    _check_depth(cfg, params)
    return _logits(cfg, params, h)


def unembed(cfg: DecoderConfig, params: dict, h):
    """Final norm, head (tied or lm_head) and final soft-capping: h [B,T,D] -> logits [B,T,V] float32."""
    return _unembed(cfg, params, h)
