"""Hugging Face checkpoints <-> (DecoderConfig, params).

Sources: a local HF folder (config.json + *.safetensors, sharded or not, read with safetensors'
numpy API so bf16 arrives as ml_dtypes.bfloat16), an HF state dict, an in-memory transformers
model (duck-typed: torch is never imported here), a hub id (huggingface_hub), a GGUF file
(`models.gguf.load_gguf`) or a zoo name (`models.zoo.load_zoo`); `load` dispatches.
`export_hf_folder` writes config.json + model.safetensors that transformers (4.56+ and 5.x) loads, and
the tokenizer too when one is passed. Every loaded tensor is checked (floating dtype, finite values).

HF linear weights are [out, in]; ours are [in, out] (x @ W), so conversion transposes them.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from prunesae_jax.errors import InputError, MissingFileError, first_nonfinite
from prunesae_jax.io import atomic_file, atomic_write_bytes, atomic_write_json, make_dirs
from prunesae_jax.models.config import DTYPES, PRUNABLE, DecoderConfig
from prunesae_jax.models.decoder import layer_param_names, layer_param_shapes

# Our layer name -> HF name under model.layers.{i}., per family (the Gemma architectures share theirs;
# llama calls its pre-MLP norm post_attention_layernorm).
_LLAMA_NAMES = {
    'input_norm': 'input_layernorm',
    'pre_mlp_norm': 'post_attention_layernorm',
}
_GEMMA_NAMES = {
    'input_norm': 'input_layernorm',
    'post_attn_norm': 'post_attention_layernorm',
    'pre_mlp_norm': 'pre_feedforward_layernorm',
    'post_mlp_norm': 'post_feedforward_layernorm',
    'q_norm': 'self_attn.q_norm',
    'k_norm': 'self_attn.k_norm',
}
for _table in (_LLAMA_NAMES, _GEMMA_NAMES):
    _table.update({n: f'self_attn.{n}' for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj')})
    _table.update({n: f'mlp.{n}' for n in ('gate_proj', 'up_proj', 'down_proj')})
_HF_LAYER_NAMES = {'llama': _LLAMA_NAMES, 'gemma2': _GEMMA_NAMES, 'gemma3_text': _GEMMA_NAMES}

# Prefixes other checkpoints put in front of the causal-LM names (multimodal Gemma 3, older exports).
_PREFIX_ALIASES = (
    ('model.language_model.', 'model.'),
    ('language_model.model.', 'model.'),
    ('language_model.lm_head.', 'lm_head.'),
)

_NP_DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}


def _check_dtype(dtype: str) -> str:
    dtype = str(dtype).replace('torch.', '')
    if dtype not in DTYPES:
        raise InputError(f'dtype={dtype!r} is not supported; expected one of {DTYPES}')
    return dtype


def _to_numpy(x) -> np.ndarray:
    """numpy / jax / torch (duck-typed, without importing torch) -> numpy."""
    if hasattr(x, 'detach'):  # a torch tensor; numpy has no bf16, so go through float32
        x = x.detach().cpu()
        if str(x.dtype) == 'torch.bfloat16':
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


# Floating dtypes a checkpoint tensor may arrive in (ml_dtypes' bfloat16 has numpy kind 'V', not 'f').
_FLOAT_NAMES = ('bfloat16', 'float8_e4m3fn', 'float8_e5m2')


def _checked_weight(name: str, arr: np.ndarray, np_dtype, dtype: str) -> np.ndarray:
    """arr cast to np_dtype; InputError for a non-floating tensor or one with NaN / inf (before or after the cast).

    Integer / bool tensors (quantised checkpoints, a wrong file) would otherwise be cast silently into
    meaningless weights, and a non-finite weight only shows up much later as a non-finite loss.
    """
    if not (arr.dtype.kind == 'f' or arr.dtype.name in _FLOAT_NAMES):
        raise InputError(
            f'tensor {name!r} has dtype {arr.dtype}; accepted: a floating dtype (float32, bfloat16, '
            'float16, float64), not an integer / quantised tensor'
        )
    bad = first_nonfinite(arr)
    if bad:
        n_bad, idx = bad
        raise InputError(
            f'tensor {name!r} holds {n_bad} non-finite value(s), first '
            f'{float(arr[idx])} at index {idx}; accepted: a checkpoint with finite weights'
        )
    with np.errstate(over='ignore'):
        out = arr.astype(np_dtype)
    if out.dtype != arr.dtype and not np.isfinite(out).all():
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(out))[0])
        raise InputError(
            f'tensor {name!r} value {float(arr[idx])} at index {idx} overflows dtype={dtype!r}; '
            'accepted: a dtype wide enough for the checkpoint (e.g. float32 or bfloat16)'
        )
    return out


def _normalise_keys(state_dict: dict) -> dict:
    out = {}
    for k, v in state_dict.items():
        for old, new in _PREFIX_ALIASES:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        out[k] = v
    return out


def from_hf_state_dict(hf_config: Any, state_dict: dict, dtype: str = 'float32') -> tuple[DecoderConfig, dict]:
    """HF config (dict or PretrainedConfig) + state dict keyed by HF names -> (cfg, params).

    Values may be numpy (incl. ml_dtypes bf16), jax or torch arrays; they are cast to dtype.
    Raises InputError (a ValueError) naming the tensor when one is missing, its shape disagrees with the
    config, it is not floating point, or it holds NaN / inf (also after the cast to dtype). Every loader
    (HF folders, hub ids, GGUF files, zoo models, in-memory transformers models) comes through here.
    """
    dtype = _check_dtype(dtype)
    cfg = hf_config if isinstance(hf_config, DecoderConfig) else DecoderConfig.from_hf(hf_config, dtype=dtype)
    cfg = cfg.replace(dtype=dtype)
    sd = _normalise_keys(state_dict)
    np_dtype = _NP_DTYPES[dtype]

    def get(name: str, shape: tuple, transpose: bool):
        if name not in sd:
            raise InputError(
                f'tensor {name!r} is missing from the checkpoint; expected every tensor of a '
                f'{cfg.family} model with {cfg.num_layers} layers'
            )
        arr = _to_numpy(sd[name])
        want = shape[::-1] if transpose else shape
        if tuple(arr.shape) != tuple(want):
            raise InputError(f'tensor {name!r} has shape {tuple(arr.shape)}; the config expects {tuple(want)}')
        arr = _checked_weight(name, arr, np_dtype, dtype)
        if transpose:
            arr = arr.T
        return jnp.asarray(arr)

    D, V = cfg.hidden_size, cfg.vocab_size
    names = _HF_LAYER_NAMES[cfg.family]
    shapes = layer_param_shapes(cfg)
    params: dict = {
        'embed': get('model.embed_tokens.weight', (V, D), False),
        'final_norm': get('model.norm.weight', (D,), False),
        'layers': [
            {n: get(f'model.layers.{i}.{names[n]}.weight', shapes[n], n in PRUNABLE) for n in layer_param_names(cfg)}
            for i in range(cfg.num_layers)
        ],
    }
    if not cfg.tie_word_embeddings:
        params['lm_head'] = get('lm_head.weight', (D, V), True)
    return cfg, params


def to_hf_state_dict(cfg: DecoderConfig, params: dict, masks: dict | None = None) -> dict[str, np.ndarray]:
    """params (optionally with pruning masks applied) -> numpy state dict with HF names and layout."""
    np_dtype = _NP_DTYPES[cfg.dtype]

    def arr(x):
        return np.ascontiguousarray(np.asarray(x).astype(np_dtype))

    names = _HF_LAYER_NAMES[cfg.family]
    sd = {'model.embed_tokens.weight': arr(params['embed']), 'model.norm.weight': arr(params['final_norm'])}
    for i, lp in enumerate(params['layers']):
        lm = masks['layers'][i] if masks is not None else {}
        for n in layer_param_names(cfg):
            w = np.asarray(lp[n])
            m = lm.get(n) if isinstance(lm, dict) else None
            if m is not None:
                w = np.where(np.asarray(m), w, np.zeros((), w.dtype))
            sd[f'model.layers.{i}.{names[n]}.weight'] = arr(w.T if n in PRUNABLE else w)
    if not cfg.tie_word_embeddings:
        sd['lm_head.weight'] = arr(np.asarray(params['lm_head']).T)
    return sd


# --------------------------------------------------------------------------- safetensors folders


def _read_safetensors(path: str, wanted: set[str] | None = None) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise MissingFileError(f'weight file {path!r} does not exist; expected a .safetensors file')
    out = {}
    try:
        with safe_open(path, framework='numpy') as f:
            for k in f.keys():
                if wanted is None or k in wanted:
                    out[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error type for truncated/garbled files
        raise InputError(
            f'weight file {path!r} is corrupt or unreadable ({type(e).__name__}: '
            f'{str(e).splitlines()[0] if str(e) else ""}); expected a valid safetensors file'
        ) from None
    return out


def read_hf_folder_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of an HF folder: model.safetensors.index.json shards, or every *.safetensors."""
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)['weight_map']
        except (ValueError, KeyError) as e:
            raise InputError(f'index {index!r} is not valid JSON with a weight_map ({e})') from None
        files: dict[str, set[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(fname, set()).add(name)
        sd = {}
        for fname, names in sorted(files.items()):
            sd.update(_read_safetensors(os.path.join(path, fname), names))
        return sd
    files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
    if not files:
        raise MissingFileError(
            f'no *.safetensors weights in {path!r}; expected model.safetensors or shards '
            'with model.safetensors.index.json'
        )
    sd = {}
    for fname in files:
        sd.update(_read_safetensors(os.path.join(path, fname)))
    return sd


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, 'config.json')
    if not os.path.isfile(cfg_path):
        raise MissingFileError(f'{cfg_path!r} does not exist; expected an HF model folder with config.json')
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except ValueError as e:
        raise InputError(f'{cfg_path!r} is not valid JSON ({e}); expected an HF config.json') from None


def load_hf_folder(path: str, dtype: str = 'float32') -> tuple[DecoderConfig, dict]:
    """Local HF folder (config.json + *.safetensors, sharded or not) -> (cfg, params) in dtype."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingFileError(
            f'model folder {path!r} does not exist; expected a folder with config.json and *.safetensors'
        )
    hf_config = read_hf_config(path)
    DecoderConfig.from_hf(hf_config)  # reject unsupported model types before reading weights
    return from_hf_state_dict(hf_config, read_hf_folder_tensors(path), dtype=dtype)


def from_transformers(model: Any, dtype: str | None = None) -> tuple[DecoderConfig, dict]:
    """An in-memory transformers *ForCausalLM -> (cfg, params); dtype defaults to the model's."""
    if not hasattr(model, 'config') or not hasattr(model, 'state_dict'):
        raise InputError(
            f'model of type {type(model).__name__} is not accepted; expected a transformers '
            'PreTrainedModel (LlamaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM)'
        )
    if dtype is None:
        dtype = str(getattr(model, 'dtype', 'float32')).replace('torch.', '')
    return from_hf_state_dict(model.config, model.state_dict(), dtype=dtype)


def download_hub(repo_id: str) -> str:
    """Local folder of a hub snapshot (config.json + safetensors); a one-line error when offline."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id,
            allow_patterns=[
                'config.json',
                '*.safetensors',
                'model.safetensors.index.json',
                'tokenizer*',
                'special_tokens_map.json',
                'generation_config.json',
            ],
        )
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ''
        raise InputError(
            f'could not fetch hub model {repo_id!r} ({type(e).__name__}: {msg[:160]}); download it '
            'where the network allows and pass the local folder instead, e.g. load("/path/to/folder")'
        ) from None


def load_hub(repo_id: str, dtype: str = 'float32') -> tuple[DecoderConfig, dict]:
    """A hub id such as 'google/gemma-3-1b-pt' -> (cfg, params), via huggingface_hub."""
    return load_hf_folder(download_hub(repo_id), dtype=dtype)


def _cast(cfg: DecoderConfig, params: dict, dtype: str) -> tuple[DecoderConfig, dict]:
    if cfg.dtype == dtype:
        return cfg, params
    jdt = jnp.dtype(dtype)
    return cfg.replace(dtype=dtype), jax.tree.map(lambda x: jnp.asarray(x).astype(jdt), params)


def _call_with_dtype(fn, arg, dtype):
    if 'dtype' in inspect.signature(fn).parameters:
        return fn(arg, dtype=dtype)
    return fn(arg)


_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')


def load_gguf(path: str, dtype: str = 'float32') -> tuple[DecoderConfig, dict]:
    """A GGUF file -> (cfg, params), dequantised (see `prunesae_jax.models.gguf`)."""
    from prunesae_jax.models import gguf

    out = _call_with_dtype(gguf.load_gguf, os.fspath(path), dtype)
    return _cast(out[0], out[1], _check_dtype(dtype))


def _kind(spec: str) -> str:
    """'folder' | 'gguf' | 'hub' | 'zoo' for a model spec; FileNotFoundError for a missing path."""
    if os.path.isdir(spec):
        return 'folder'
    if spec.lower().endswith('.gguf'):
        if not os.path.isfile(spec):
            raise MissingFileError(f'GGUF file {spec!r} does not exist')
        return 'gguf'
    looks_local = spec.startswith(('/', '.', '~')) or spec.count('/') > 1
    if looks_local or os.path.exists(spec):
        raise MissingFileError(
            f'{spec!r} is not a model folder or .gguf file; expected a folder with config.json '
            'and *.safetensors, a .gguf file, a zoo name or a hub id'
        )
    if _HUB_ID.match(spec):
        return 'hub'
    if '/' not in spec:
        return 'zoo'
    raise InputError(
        f'model spec {spec!r} is not understood; expected a folder, a .gguf file, a zoo name or a '
        'hub id like "google/gemma-3-1b-pt"'
    )


def load(spec: str, dtype: str = 'float32') -> tuple[DecoderConfig, dict]:
    """(cfg, params) from an HF folder, a .gguf file, a zoo name ('gemma-3-270m', 'smollm2-135m') or a hub id."""
    dtype = _check_dtype(dtype)
    spec = os.fspath(spec)
    kind = _kind(spec)
    if kind == 'folder':
        return load_hf_folder(spec, dtype=dtype)
    if kind == 'gguf':
        return load_gguf(spec, dtype=dtype)
    if kind == 'hub':
        return load_hub(spec, dtype=dtype)
    from prunesae_jax.models import zoo

    out = _call_with_dtype(zoo.load_zoo, spec, dtype)
    return _cast(out[0], out[1], dtype)


def load_tokenizer(spec: str):
    """The transformers tokenizer (AutoTokenizer) for the same specs `load` accepts."""
    from transformers import AutoTokenizer

    spec = os.fspath(spec)
    kind = _kind(spec)
    if kind == 'folder':
        return AutoTokenizer.from_pretrained(spec)
    if kind == 'gguf':
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(spec)), gguf_file=os.path.basename(spec))
    if kind == 'hub':
        return AutoTokenizer.from_pretrained(download_hub(spec))
    from prunesae_jax.models import zoo

    return zoo.load_tokenizer(spec)


# --------------------------------------------------------------------------- export


def export_hf_folder(
    cfg: DecoderConfig, params: dict, path: str, masks: dict | None = None, tokenizer: Any = None
) -> str:
    """Writes config.json + model.safetensors (masked weights zeroed if masks given); returns path.

    transformers' AutoModelForCausalLM.from_pretrained(path) gives the same logits as `forward`, on
    every transformers version pyproject.toml allows: config.json states RoPE both as `rope_parameters`
    (transformers >= 5) and as the legacy `rope_theta` / `rope_scaling` / `rope_local_base_freq` keys
    (transformers 4.x), with the same values (see DecoderConfig.to_hf_dict).
    tokenizer: a transformers tokenizer (anything with `save_pretrained`) to save into the folder too, so
    AutoTokenizer.from_pretrained(path) works; without it the folder holds the weights and config ONLY.
    Each file is written atomically (prunesae_jax/io.py), so readers never see half a file.
    """
    from safetensors.numpy import save

    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f'export path {path!r} is a file; expected a folder (new or existing)')
    if len(params['layers']) != cfg.num_layers:
        raise InputError(f'params has {len(params["layers"])} layers; config says num_layers={cfg.num_layers}')
    if tokenizer is not None:
        if not callable(getattr(tokenizer, 'save_pretrained', None)):
            raise InputError(
                f'tokenizer of type {type(tokenizer).__name__} has no save_pretrained(); accepted: a '
                'transformers tokenizer, or None to export the weights only'
            )
        n_tok = len(tokenizer) if hasattr(tokenizer, '__len__') else None
        if n_tok is not None and n_tok > cfg.vocab_size:
            raise InputError(
                f'tokenizer has {n_tok} tokens but the model vocab_size={cfg.vocab_size}; accepted: '
                'the tokenizer of this model (at most vocab_size tokens)'
            )
    hf_config = cfg.to_hf_dict()  # refuses a config the family's HF architecture cannot state
    folder = Path(path)
    make_dirs(folder)
    sd = to_hf_state_dict(cfg, params, masks)
    atomic_write_bytes(folder / 'model.safetensors', save(sd, metadata={'format': 'pt'}))
    atomic_write_json(folder / 'config.json', hf_config)
    if tokenizer is not None:
        with tempfile.TemporaryDirectory(dir=folder, prefix='.tokenizer.', suffix='.tmp') as tmp:
            tokenizer.save_pretrained(tmp)
            for name in sorted(os.listdir(tmp)):
                src = os.path.join(tmp, name)
                # never let a tokenizer replace the model's files
                if name in ('config.json', 'model.safetensors') or not os.path.isfile(src):
                    continue
                with open(src, 'rb') as fin, atomic_file(folder / name) as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
    return path


__all__ = [
    'download_hub',
    'export_hf_folder',
    'from_hf_state_dict',
    'from_transformers',
    'load',
    'load_gguf',
    'load_hf_folder',
    'load_hub',
    'load_tokenizer',
    'read_hf_config',
    'read_hf_folder_tensors',
    'to_hf_state_dict',
]
