"""SAE files: export to SAELens folders; import SAELens, Gemma Scope v1/v2 and EleutherAI sparsify.

Imported SAEs come back as (SAEConfig, params WITHOUT a seed axis) in our names and shapes
(W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in], threshold [n]), so core.encode /
core.reconstruct / core.evaluate run them on our activations unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from safetensors.numpy import load_file, save_file

from prunesae_jax.sae.core import SAEConfig, fold_scale
from prunesae_jax.errors import InputError, MissingFileError

# SAELens architecture names <-> ours (SAELens saves BatchTopK for inference as JumpReLU)
_TO_SAELENS = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard", "jumprelu": "jumprelu"}
_FROM_SAELENS = {"topk": "topk", "batchtopk": "batchtopk", "standard": "relu", "jumprelu": "jumprelu"}


def _one_seed(params: dict, seed: int | None, d_in: int) -> dict:
    p = {k: np.asarray(v, np.float32) for k, v in params.items()}
    if p["b_dec"].ndim == 2:  # seed axis present
        s = 0 if seed is None else int(seed)
        if not 0 <= s < p["b_dec"].shape[0]:
            raise InputError(f"seed={seed}; accepted: 0..{p['b_dec'].shape[0] - 1}")
        p = {k: v[s] for k, v in p.items()}
    if p["b_dec"].shape != (d_in,):
        raise InputError(f"b_dec shape {p['b_dec'].shape}; expected [d_in={d_in}] (or [S, d_in])")
    return p


def export_saelens(cfg: SAEConfig, params: dict, path: str, seed: int | None = 0, hook_name: str = "",
                   model_name: str = "", scale: float | None = None, extra_metadata: dict | None = None) -> str:
    """Write one SAE (seed `seed` of params [S, ...], or params without seed axis) as a SAELens folder.

    cfg.json + sae_weights.safetensors with SAELens keys/shapes. params must act on RAW activations;
    pass scale= (TrainResult.scale) to fold in the input normalisation of params_normalized.
    The folder is written to a temp dir and renamed into place.
    """
    p = _one_seed(params, seed, cfg.d_in)
    if scale is not None:
        p = {k: np.asarray(v) for k, v in fold_scale(p, scale).items()}
    arch = _TO_SAELENS[cfg.architecture]
    tensors = {k: np.ascontiguousarray(p[k], np.float32) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if arch == "jumprelu":
        # batchtopk inference relu(pre) * (pre > t) equals jumprelu pre * (pre > t) when t >= 0
        tensors["threshold"] = np.ascontiguousarray(np.maximum(p["threshold"], 0.0), np.float32)
    meta = {"model_name": model_name, "hook_name": hook_name, "hook_head_index": None, "prepend_bos": True,
            "trained_with": "prunesae_jax", "trained_architecture": cfg.architecture}
    meta.update(extra_metadata or {})
    cfg_json = {
        "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "none", "metadata": meta,
        # legacy (SAELens < 6) top-level fields, read by older loaders
        "model_name": model_name, "hook_name": hook_name, "hook_head_index": None,
    }
    if arch == "topk":
        cfg_json.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp_sae_")
    try:
        save_file(tensors, os.path.join(tmp, "sae_weights.safetensors"))
        with open(os.path.join(tmp, "cfg.json"), "w") as f:
            json.dump(cfg_json, f, indent=1)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _finish(arch, params, apply_b_dec, k=32):
    d_in, n = params["W_enc"].shape
    if params["W_dec"].shape != (n, d_in):
        raise InputError(f"W_dec shape {params['W_dec'].shape}; expected [{n}, {d_in}] to match W_enc {params['W_enc'].shape}")
    cfg = SAEConfig(d_in=int(d_in), n_latents=int(n), architecture=arch, k=int(k) if arch in ("topk", "batchtopk") else 32,
                    apply_b_dec_to_input=bool(apply_b_dec), unit_norm_decoder=False)
    keep = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if cfg.has_threshold else ())
    return cfg, {k: np.asarray(params[k], np.float32) for k in keep}


def _load_safetensors(path: str, required: tuple[str, ...]) -> dict:
    """The tensors of a safetensors file; InputError for a damaged file or a missing tensor."""
    try:
        t = load_file(path)
    except Exception as e:  # safetensors raises its own error type for truncated / garbled files
        first = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"weight file {path!r} is corrupt or unreadable ({type(e).__name__}: {first}); "
                         "accepted: a complete safetensors file") from None
    missing = [k for k in required if k not in t]
    if missing:
        raise InputError(f"weight file {path!r} lacks {missing}; accepted: a file with {list(required)}")
    return t


def load_saelens(path: str):
    """SAELens folder (cfg.json + sae_weights.safetensors) -> (SAEConfig, params)."""
    try:
        with open(os.path.join(path, "cfg.json")) as f:
            c = json.load(f)
    except ValueError as e:
        raise InputError(f"cfg.json in {path!r} is not valid JSON ({e}); accepted: a SAELens cfg.json") from None
    arch = c.get("architecture", "standard")
    if arch not in _FROM_SAELENS:
        raise InputError(f"SAELens architecture {arch!r} in {path!r}; supported: {sorted(_FROM_SAELENS)}")
    if c.get("normalize_activations", "none") not in ("none", None):
        raise InputError(f"normalize_activations={c['normalize_activations']!r} in {path!r}; only 'none' is supported")
    t = _load_safetensors(os.path.join(path, "sae_weights.safetensors"), ("W_enc", "b_enc", "W_dec", "b_dec"))
    if arch == "batchtopk" and "threshold" not in t:
        t["threshold"] = np.zeros((t["W_enc"].shape[1],), np.float32)
    return _finish(_FROM_SAELENS[arch], t, c.get("apply_b_dec_to_input", True), c.get("k", 32))


def load_gemmascope(path: str):
    """Gemma Scope JumpReLU SAE: v1 params.npz (W_*) or v2 params.safetensors (w_*); path = file or folder."""
    if os.path.isdir(path):
        for name in ("params.npz", "params.safetensors"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise MissingFileError(f"no params.npz or params.safetensors in {path!r}")
    if path.endswith(".npz"):
        with np.load(path) as z:
            raw = {k: z[k] for k in z.files}
    else:
        raw = load_file(path)
    low = {k.lower(): v for k, v in raw.items()}
    missing = {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"} - set(low)
    if missing:
        raise InputError(f"Gemma Scope file {path!r} lacks {sorted(missing)}; found {sorted(raw)}")
    p = {"W_enc": low["w_enc"], "W_dec": low["w_dec"], "b_enc": low["b_enc"], "b_dec": low["b_dec"],
         "threshold": low["threshold"]}
    # Gemma Scope encodes x @ W_enc + b_enc without subtracting b_dec
    return _finish("jumprelu", p, apply_b_dec=False)


def load_sparsify(path: str):
    """EleutherAI sparsify folder (cfg.json with k + sae.safetensors: encoder.weight [n, d], W_dec [n, d])."""
    with open(os.path.join(path, "cfg.json")) as f:
        c = json.load(f)
    t = load_file(os.path.join(path, "sae.safetensors"))
    if c.get("skip_connection") or "W_skip" in t:
        raise InputError(f"sparsify SAE {path!r} has a skip connection; only plain TopK SAEs are supported")
    p = {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if "k" not in c:
        raise InputError(f"sparsify cfg.json in {path!r} has no 'k'")
    return _finish("topk", p, apply_b_dec=True, k=c["k"])


def load_sae(path: str):
    """Load any supported SAE from a folder or file -> (SAEConfig, params without seed axis)."""
    if not os.path.exists(path):
        raise MissingFileError(f"no SAE at {path!r}")
    if os.path.isfile(path):
        if path.endswith((".npz", ".safetensors")):
            return load_gemmascope(path)
        raise InputError(f"SAE file {path!r}; accepted files: params.npz, params.safetensors (Gemma Scope)")
    files = set(os.listdir(path))
    if {"cfg.json", "sae_weights.safetensors"} <= files:
        return load_saelens(path)
    if {"cfg.json", "sae.safetensors"} <= files:
        return load_sparsify(path)
    if "params.npz" in files or "params.safetensors" in files:
        return load_gemmascope(path)
    raise InputError(f"no SAE files in {path!r}; expected SAELens (cfg.json + sae_weights.safetensors), "
                     "sparsify (cfg.json + sae.safetensors) or Gemma Scope (params.npz / params.safetensors)")
