"""SAE files: export to SAELens folders; import SAELens, Gemma Scope v1/v2 and EleutherAI sparsify.

Imported SAEs come back as (SAEConfig, params WITHOUT a seed axis) in our names and shapes
(W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in], threshold [n]), so sae.encode /
sae.reconstruct / sae.evaluate run them on our activations unchanged.

Every import either reproduces the file's own inference maths exactly or is refused with an
InputError naming what is not supported:
  * every tensor must be floating point (float16 / bfloat16 / float32 / float64), finite (after the
    cast to float32) and of the shape the others imply; a file holding any tensor the format does not
    define (a skip connection, a transcoder's extra weights, ...) is refused rather than half-loaded;
  * SAELens: `rescale_acts_by_decoder_norm` TopK / BatchTopK SAEs are folded exactly (SAELens's own
    `_fold_norm_topk`: W_enc columns and b_enc times the decoder row norms, W_dec rows normalised);
    a BatchTopK training checkpoint (architecture 'batchtopk', scalar `topk_threshold`) becomes our
    batchtopk with that threshold on every latent; pre-6.0 configs (no sae_lens_version >= 6) are
    read as SAELens reads them (`activation_fn_str: topk` with `activation_fn_kwargs.k` is a TopK SAE);
    a TopK config without k is refused (SAELens would silently use its own default);
  * JumpReLU thresholds are clamped at 0: relu(pre) * (pre > t) (SAELens, Gemma Scope) equals our
    pre * (pre > max(t, 0)) exactly;
  * sparsify: only plain TopK autoencoders (activation 'topk', no transcode / skip connection);
  * Gemma Scope: plain JumpReLU SAEs only; skip transcoders (`affine_skip_connection` / `w_skip`) are
    refused. A Gemma Scope transcoder WITHOUT a skip connection has exactly an SAE's tensors and cannot
    be told apart from one by its file: load only SAEs of the site you capture.
Damaged files (truncated safetensors / npz, invalid JSON, a cfg that is not an object) raise
InputError too, never the reader's own exception.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
from safetensors.numpy import load_file, save

from prunesae_jax import io as pio
from prunesae_jax.errors import InputError, MissingFileError, first_nonfinite
from prunesae_jax.sae.config import SAEConfig
from prunesae_jax.sae.core import fold_scale

# SAELens architecture names <-> ours (SAELens saves BatchTopK for inference as JumpReLU)
_TO_SAELENS = {'topk': 'topk', 'batchtopk': 'jumprelu', 'relu': 'standard', 'jumprelu': 'jumprelu'}
_FROM_SAELENS = {'topk': 'topk', 'batchtopk': 'batchtopk', 'standard': 'relu', 'jumprelu': 'jumprelu'}

# floating dtypes numpy / ml_dtypes may hand back (bfloat16 & co. have numpy kind 'V', not 'f')
_ML_FLOATS = ('bfloat16', 'float8_e4m3fn', 'float8_e4m3fnuz', 'float8_e5m2', 'float8_e5m2fnuz', 'float8_e4m3b11fnuz')


def _one_seed(params: dict, seed: int | None, d_in: int) -> dict:
    p = {k: np.asarray(v, np.float32) for k, v in params.items()}
    if p['b_dec'].ndim == 2:  # seed axis present
        s = 0 if seed is None else int(seed)
        if not 0 <= s < p['b_dec'].shape[0]:
            raise InputError(f'seed={seed}; accepted: 0..{p["b_dec"].shape[0] - 1}')
        p = {k: v[s] for k, v in p.items()}
    if p['b_dec'].shape != (d_in,):
        raise InputError(f'b_dec shape {p["b_dec"].shape}; expected [d_in={d_in}] (or [S, d_in])')
    return p


def export_saelens(
    cfg: SAEConfig,
    params: dict,
    path: str,
    seed: int | None = 0,
    hook_name: str = '',
    model_name: str = '',
    scale: float | None = None,
    extra_metadata: dict | None = None,
) -> str:
    """Write one SAE (seed `seed` of params [S, ...], or params without seed axis) as a SAELens folder.

    cfg.json + sae_weights.safetensors with SAELens keys/shapes. params must act on RAW activations;
    pass scale= (TrainResult.scale) to fold in the input normalisation of params_normalized.
    The folder is written to a temp dir and renamed into place.
    """
    p = _one_seed(params, seed, cfg.d_in)
    if scale is not None:
        p = {k: np.asarray(v) for k, v in fold_scale(p, scale).items()}
    arch = _TO_SAELENS[cfg.architecture]
    tensors = {k: np.ascontiguousarray(p[k], np.float32) for k in ('W_enc', 'b_enc', 'W_dec', 'b_dec')}
    if arch == 'jumprelu':
        # batchtopk inference relu(pre) * (pre > t) equals jumprelu pre * (pre > t) when t >= 0
        tensors['threshold'] = np.ascontiguousarray(np.maximum(p['threshold'], 0.0), np.float32)
    meta = {
        'model_name': model_name,
        'hook_name': hook_name,
        'hook_head_index': None,
        'prepend_bos': True,
        'trained_with': 'prunesae_jax',
        'trained_architecture': cfg.architecture,
    }
    meta.update(extra_metadata or {})
    cfg_json = {
        'architecture': arch,
        'd_in': cfg.d_in,
        'd_sae': cfg.n_latents,
        'dtype': 'float32',
        'device': 'cpu',
        'apply_b_dec_to_input': cfg.apply_b_dec_to_input,
        'normalize_activations': 'none',
        'reshape_activations': 'none',
        'metadata': meta,
        # legacy (SAELens < 6) top-level fields, read by older loaders
        'model_name': model_name,
        'hook_name': hook_name,
        'hook_head_index': None,
    }
    if arch == 'topk':
        cfg_json.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    tmp = pio.make_temp_dir(os.path.dirname(os.path.abspath(path)), '.tmp_sae_')
    try:
        pio.atomic_write_bytes(tmp / 'sae_weights.safetensors', save(tensors))
        pio.atomic_write_text(tmp / 'cfg.json', json.dumps(cfg_json, indent=1))
        pio.commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ----------------------------------------------------------------------------- reading files


def _first_line(e: BaseException) -> str:
    s = str(e)
    return s.splitlines()[0][:200] if s else ''


def _read_json(path: str, what: str) -> dict:
    """A JSON object from `path`; MissingFileError / InputError (one line) for a missing or bad file."""
    if not os.path.isfile(path):
        raise MissingFileError(f'{what} {path!r} does not exist')
    try:
        with open(path, encoding='utf-8') as f:
            c = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(
            f'{what} {path!r} is not valid JSON ({type(e).__name__}: {_first_line(e)}); accepted: a JSON object'
        ) from None
    if not isinstance(c, dict):
        raise InputError(f'{what} {path!r} holds a JSON {type(c).__name__}; accepted: a JSON object')
    return c


def _load_safetensors(path: str) -> dict:
    """Every tensor of a safetensors file; InputError for a missing, truncated or garbled file."""
    if not os.path.isfile(path):
        raise MissingFileError(f'weight file {path!r} does not exist')
    try:
        return dict(load_file(path))
    except Exception as e:  # safetensors raises its own error type for truncated / garbled files
        raise InputError(
            f'weight file {path!r} is corrupt or unreadable ({type(e).__name__}: {_first_line(e)}); '
            'accepted: a complete safetensors file'
        ) from None


def _load_npz(path: str) -> dict:
    """Every array of an .npz file; InputError for a truncated / garbled file or one needing pickle."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except Exception as e:  # BadZipFile, EOFError, zlib.error, ValueError (pickled objects), OSError ...
        raise InputError(
            f'weight file {path!r} is corrupt or unreadable ({type(e).__name__}: {_first_line(e)}); '
            'accepted: a complete .npz of numeric arrays'
        ) from None


def _require(t: dict, names, where: str) -> None:
    missing = [k for k in names if k not in t]
    if missing:
        raise InputError(f'{where} lacks tensor(s) {missing}; found {sorted(t)}')


def _refuse_unknown(t: dict, known, where: str, hint: str = '') -> None:
    extra = sorted(set(t) - set(known))
    if extra:
        raise InputError(
            f'{where} holds tensor(s) {extra} this loader has no meaning for{hint}; accepted: only {sorted(known)}'
        )


def _is_float(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype.kind == 'f' or dtype.name in _ML_FLOATS


def _float32(name: str, arr, where: str) -> np.ndarray:
    """arr as float32, refusing non-floating dtypes and non-finite values (checked after the cast)."""
    arr = np.asarray(arr)
    if not _is_float(arr.dtype):
        raise InputError(
            f'{where}: tensor {name!r} has dtype {arr.dtype}; accepted: a floating dtype '
            '(float16, bfloat16, float32, float64), never integers or bools'
        )
    with np.errstate(over='ignore', invalid='ignore'):  # float64 beyond float32's range -> inf, refused below
        out = np.ascontiguousarray(arr, dtype=np.float32)
    bad = first_nonfinite(out)
    if bad:
        n_bad, idx = bad
        raise InputError(
            f'{where}: tensor {name!r} holds {n_bad} non-finite value(s), first '
            f'{float(arr[idx])} at index {idx} (after the cast to float32); accepted: finite values'
        )
    return out


def _checked_params(t: dict, names, where: str) -> dict:
    """{name: float32 array} for the named tensors of t, with dtype family, finiteness and shapes checked.

    Shapes: W_enc [d_in, n] fixes d_in and n; b_enc [n], W_dec [n, d_in], b_dec [d_in], threshold [n].
    """
    p = {k: _float32(k, t[k], where) for k in names}
    if p['W_enc'].ndim != 2 or 0 in p['W_enc'].shape:
        raise InputError(f'{where}: W_enc has shape {p["W_enc"].shape}; accepted: [d_in, n_latents], both > 0')
    d_in, n = p['W_enc'].shape
    want = {'b_enc': (n,), 'W_dec': (n, d_in), 'b_dec': (d_in,), 'threshold': (n,)}
    for k, shape in want.items():
        if k in p and p[k].shape != shape:
            raise InputError(
                f'{where}: {k} has shape {p[k].shape}; expected {list(shape)} to match W_enc '
                f'[d_in={d_in}, n_latents={n}]'
            )
    return p


def _int_k(k, where: str, n: int, allow_fraction: bool = False) -> int:
    """A TopK / BatchTopK k from a config: a positive number (integral unless allow_fraction), <= n."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k):
        raise InputError(f'{where}: k={k!r}; accepted: a positive integer <= d_sae={n}')
    if not allow_fraction and k != int(k):
        raise InputError(f'{where}: k={k!r}; accepted: a positive integer <= d_sae={n}')
    ki = int(round(k))
    if not 1 <= ki <= n:
        raise InputError(f'{where}: k={k!r}; accepted: 1 <= k <= d_sae={n}')
    return ki


def _finish(arch: str, p: dict, apply_b_dec: bool, k: int | None = None):
    """(SAEConfig, params) from checked float32 params in our names."""
    d_in, n = p['W_enc'].shape
    cfg = SAEConfig(
        d_in=int(d_in),
        n_latents=int(n),
        architecture=arch,
        k=int(k) if arch in ('topk', 'batchtopk') else SAEConfig.k,
        apply_b_dec_to_input=bool(apply_b_dec),
        unit_norm_decoder=False,
    )
    keep = ('W_enc', 'b_enc', 'W_dec', 'b_dec') + (('threshold',) if cfg.has_threshold else ())
    return cfg, {name: p[name] for name in keep}


def _fold_decoder_norms(p: dict, where: str) -> dict:
    """SAELens's rescale_acts_by_decoder_norm, folded: pre * |W_dec_i| selected, z / |W_dec_i| decoded.

    Exact reparametrisation (SAELens `_fold_norm_topk`): W_enc[:, i] and b_enc[i] times |W_dec_i|,
    W_dec_i / |W_dec_i|; any threshold is already in the rescaled units and stays.
    """
    norms = np.linalg.norm(p['W_dec'].astype(np.float64), axis=1)
    if not (norms > 0).all():
        i = int(np.argmin(norms > 0))
        raise InputError(
            f'{where}: decoder row {i} has norm 0, so rescale_acts_by_decoder_norm divides by 0; '
            'accepted: non-zero decoder rows'
        )
    q = dict(p)
    q['W_enc'] = (p['W_enc'] * norms[None, :]).astype(np.float32)
    q['b_enc'] = (p['b_enc'] * norms).astype(np.float32)
    q['W_dec'] = (p['W_dec'] / norms[:, None]).astype(np.float32)
    return q


def _saelens_version(c: dict) -> tuple[int, ...] | None:
    v = c.get('sae_lens_version')
    if not v and isinstance(c.get('metadata'), dict):
        v = c['metadata'].get('sae_lens_version')
    if not v:
        return None
    parts = []
    for piece in str(v).split('.'):
        digits = ''.join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ''
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or None


def _flag(c: dict, name: str, where: str) -> bool:
    v = c.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise InputError(f'{where}: {name}={v!r}; accepted: true or false')
    return v


_SAELENS_TENSORS = ('W_enc', 'b_enc', 'W_dec', 'b_dec', 'threshold', 'topk_threshold', 'scaling_factor')


def load_saelens(path: str):
    """SAELens folder (cfg.json + sae_weights.safetensors) -> (SAEConfig, params); see the module doc."""
    where = f'SAELens SAE {path!r}'
    c = _read_json(os.path.join(path, 'cfg.json'), 'SAELens cfg.json')
    version = _saelens_version(c)
    pre6 = version is None or version < (6,)
    arch = c.get('architecture', 'standard')
    act = c.get('activation_fn_str', c.get('activation_fn')) if pre6 else None
    for key, v in (('architecture', arch), ('activation_fn_str', act)):
        if v is not None and not isinstance(v, str):
            raise InputError(f"{where}: {key}={v!r}; accepted: a string such as 'topk'")
    kwargs = c.get('activation_fn_kwargs') or {}
    if not isinstance(kwargs, dict):
        raise InputError(f'{where}: activation_fn_kwargs={kwargs!r}; accepted: an object such as {{"k": 32}}')
    if pre6 and act not in (None, 'relu'):
        # SAELens < 6 expressed TopK as activation_fn_str 'topk' (+ activation_fn_kwargs.k) on 'standard'
        if act != 'topk':
            raise InputError(f"{where}: activation_fn_str={act!r}; supported: 'relu', 'topk'")
        if arch not in ('standard', 'topk'):
            raise InputError(
                f"{where}: activation_fn_str='topk' with architecture={arch!r}; accepted: "
                "architecture 'standard' or 'topk'"
            )
        arch = 'topk'
    if arch not in _FROM_SAELENS:
        raise InputError(f'{where}: architecture {arch!r}; supported: {sorted(_FROM_SAELENS)}')
    norm = c.get('normalize_activations', 'none')
    if pre6 and norm is False:
        norm = 'none'
    if norm not in ('none', None):
        raise InputError(f"{where}: normalize_activations={norm!r}; only 'none' is supported")
    rescale = _flag(c, 'rescale_acts_by_decoder_norm', where)
    if rescale and arch not in ('topk', 'batchtopk'):
        raise InputError(
            f'{where}: rescale_acts_by_decoder_norm=true with architecture {arch!r}; '
            "supported with 'topk' and 'batchtopk' only"
        )
    apply_b_dec = c.get('apply_b_dec_to_input', True)
    if not isinstance(apply_b_dec, bool):
        raise InputError(f'{where}: apply_b_dec_to_input={apply_b_dec!r}; accepted: true or false')

    t = _load_safetensors(os.path.join(path, 'sae_weights.safetensors'))
    _require(t, ('W_enc', 'b_enc', 'W_dec', 'b_dec'), where)
    _refuse_unknown(t, _SAELENS_TENSORS, where)
    if 'threshold' in t and arch in ('standard', 'topk'):
        raise InputError(
            f"{where}: a 'threshold' tensor in a {arch!r} SAE, which has none; accepted: a file whose "
            'tensors match its architecture'
        )
    names = ['W_enc', 'b_enc', 'W_dec', 'b_dec']
    if arch == 'jumprelu':
        _require(t, ('threshold',), where)
        names.append('threshold')
    p = _checked_params(t, names, where)
    d_in, n = p['W_enc'].shape
    for key, got in (('d_in', d_in), ('d_sae', n)):
        if key in c and c[key] != got:
            raise InputError(
                f'{where}: cfg.json says {key}={c[key]!r} but the weights have {got}; accepted: '
                'a cfg.json that matches its weights'
            )
    if 'scaling_factor' in t:  # SAELens < 6 finetuning scale: decode(z * s) = z @ (s[:, None] * W_dec)
        s = _float32('scaling_factor', t['scaling_factor'], where)
        if s.shape != (n,):
            raise InputError(f'{where}: scaling_factor has shape {s.shape}; expected [{n}]')
        if not np.all(s == 1.0):
            if not c.get('finetuning_scaling_factor'):
                raise InputError(
                    f'{where}: a scaling_factor tensor other than 1 with finetuning_scaling_factor '
                    'off; accepted: a consistent SAELens file'
                )
            p['W_dec'] = (p['W_dec'] * s[:, None]).astype(np.float32)

    k = None
    if arch == 'topk':
        # SAELens < 6 takes k from activation_fn_kwargs when it is there (handle_pre_6_0_config)
        k = kwargs['k'] if pre6 and kwargs.get('k') is not None else c.get('k')
        if k is None:
            raise InputError(
                f"{where}: a TopK SAE without k (neither 'k' nor activation_fn_kwargs.k); "
                'accepted: a cfg.json stating k'
            )
        k = _int_k(k, where, n)
    if arch == 'batchtopk':
        # a SAELens BatchTopK TRAINING checkpoint (inference files are saved as jumprelu): the threshold is
        # the scalar EMA `topk_threshold`, applied to the (rescaled) pre-activations of every latent
        if 'threshold' in t:
            thr = _float32('threshold', t['threshold'], where)
        elif 'topk_threshold' in t:
            thr = _float32('topk_threshold', t['topk_threshold'], where)
        else:
            raise InputError(
                f'{where}: a batchtopk file without topk_threshold / threshold; accepted: a SAELens '
                'BatchTopK checkpoint with its threshold'
            )
        if thr.size != 1 and thr.shape != (n,):
            raise InputError(f'{where}: batchtopk threshold has shape {thr.shape}; expected a scalar or [{n}]')
        p['threshold'] = np.broadcast_to(thr.reshape(-1) if thr.ndim else thr, (n,)).astype(np.float32)
        if c.get('k') is None:
            raise InputError(f'{where}: a BatchTopK SAE without k; accepted: a cfg.json stating k')
        k = _int_k(c['k'], where, n, allow_fraction=True)
    elif 'topk_threshold' in t:
        raise InputError(
            f"{where}: tensor 'topk_threshold' in a {arch!r} SAE; accepted only with architecture 'batchtopk'"
        )
    if arch == 'jumprelu':
        p['threshold'] = np.maximum(p['threshold'], 0.0)  # relu(pre) * (pre > t) == pre * (pre > max(t, 0))
    if rescale:
        p = _fold_decoder_norms(p, where)
    return _finish(_FROM_SAELENS[arch], p, apply_b_dec, k)


def load_gemmascope(path: str):
    """Gemma Scope JumpReLU SAE: v1 params.npz (W_*) or v2 params.safetensors (w_*); path = file or folder."""
    if os.path.isdir(path):
        for name in ('params.npz', 'params.safetensors'):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise MissingFileError(f'no params.npz or params.safetensors in {path!r}')
    if not os.path.isfile(path):
        raise MissingFileError(f'Gemma Scope file {path!r} does not exist')
    where = f'Gemma Scope file {path!r}'
    raw = _load_npz(path) if path.endswith('.npz') else _load_safetensors(path)
    low = {}
    for k, v in raw.items():
        if k.lower() in low:
            raise InputError(f'{where}: tensor names {sorted(raw)} collide ignoring case; accepted: one of each')
        low[k.lower()] = v
    if any(k in low for k in ('affine_skip_connection', 'w_skip', 'b_skip')):
        raise InputError(
            f'{where} is a skip transcoder (it holds an affine skip connection); only plain JumpReLU SAEs are supported'
        )
    _require(low, ('w_enc', 'w_dec', 'b_enc', 'b_dec', 'threshold'), where)
    _refuse_unknown(low, ('w_enc', 'w_dec', 'b_enc', 'b_dec', 'threshold'), where)
    t = {
        'W_enc': low['w_enc'],
        'W_dec': low['w_dec'],
        'b_enc': low['b_enc'],
        'b_dec': low['b_dec'],
        'threshold': low['threshold'],
    }
    p = _checked_params(t, ('W_enc', 'b_enc', 'W_dec', 'b_dec', 'threshold'), where)
    # Gemma Scope: relu(pre) * (pre > threshold) with pre = x @ W_enc + b_enc (b_dec is NOT subtracted)
    p['threshold'] = np.maximum(p['threshold'], 0.0)
    return _finish('jumprelu', p, apply_b_dec=False)


# sparsify options whose SAEs compute something other than a plain TopK autoencoder of the input
_SPARSIFY_OFF = ('transcode', 'skip_connection', 'embed_skip', 'gram_lookup', 'encoder_pkm')


def load_sparsify(path: str):
    """EleutherAI sparsify folder (cfg.json with k + sae.safetensors: encoder.weight [n, d], W_dec [n, d])."""
    where = f'sparsify SAE {path!r}'
    c = _read_json(os.path.join(path, 'cfg.json'), 'sparsify cfg.json')
    activation = c.get('activation', 'topk')
    if activation != 'topk':
        raise InputError(f"{where}: activation={activation!r}; supported: 'topk' only (no GroupMax architecture)")
    for flag in _SPARSIFY_OFF:
        if c.get(flag):
            raise InputError(f'{where}: {flag}={c[flag]!r}; only plain TopK autoencoders are supported')
    t = _load_safetensors(os.path.join(path, 'sae.safetensors'))
    if 'W_skip' in t:
        raise InputError(f'{where} has a skip connection (W_skip); only plain TopK autoencoders are supported')
    _require(t, ('encoder.weight', 'encoder.bias', 'W_dec', 'b_dec'), where)
    _refuse_unknown(t, ('encoder.weight', 'encoder.bias', 'W_dec', 'b_dec'), where)
    enc = _float32('encoder.weight', t['encoder.weight'], where)
    if enc.ndim != 2:
        raise InputError(f'{where}: encoder.weight has shape {enc.shape}; accepted: [n_latents, d_in]')
    p = _checked_params(
        {'W_enc': enc.T, 'b_enc': t['encoder.bias'], 'W_dec': t['W_dec'], 'b_dec': t['b_dec']},
        ('W_enc', 'b_enc', 'W_dec', 'b_dec'),
        where,
    )
    d_in, n = p['W_enc'].shape
    if 'd_in' in c and c['d_in'] != d_in:
        raise InputError(f'{where}: cfg.json says d_in={c["d_in"]!r} but the weights have {d_in}')
    if 'k' not in c:
        raise InputError(f"{where}: cfg.json has no 'k'; accepted: a sparsify cfg.json stating k")
    # sparsify: top-k of relu(pre) == our relu of top-k(pre) (relu is monotone; zeros stay zeros)
    return _finish('topk', p, apply_b_dec=True, k=_int_k(c['k'], where, n))


def load_sae(path: str):
    """Load any supported SAE from a folder or file -> (SAEConfig, params without seed axis)."""
    if not os.path.exists(path):
        raise MissingFileError(f'no SAE at {path!r}')
    if os.path.isfile(path):
        if path.endswith(('.npz', '.safetensors')):
            return load_gemmascope(path)
        raise InputError(f'SAE file {path!r}; accepted files: params.npz, params.safetensors (Gemma Scope)')
    files = set(os.listdir(path))
    if {'cfg.json', 'sae_weights.safetensors'} <= files:
        return load_saelens(path)
    if {'cfg.json', 'sae.safetensors'} <= files:
        return load_sparsify(path)
    if 'params.npz' in files or 'params.safetensors' in files:
        return load_gemmascope(path)
    raise InputError(
        f'no SAE files in {path!r}; expected SAELens (cfg.json + sae_weights.safetensors), '
        'sparsify (cfg.json + sae.safetensors) or Gemma Scope (params.npz / params.safetensors)'
    )
