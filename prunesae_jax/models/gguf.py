"""Reading GGUF checkpoints (llama.cpp's format) into Hugging Face names, layout and config.

`read_gguf` dequantises every tensor with the `gguf` package and undoes what llama.cpp's
`convert_hf_to_gguf.py` did to the Hugging Face weights, the same way transformers' GGUF loader
does, so the result equals `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`:
  * llama: q/k rows were permuted from HF's rotate-half RoPE layout to GGML's interleaved one;
    the inverse permutation is applied.
  * gemma2 / gemma3: every `*norm.weight` was stored as (1 + w); 1 is subtracted (in float32).
  * tied embeddings: no `output.weight` tensor means `tie_word_embeddings=True`.
The config is rebuilt from the metadata with transformers' defaults for what the file does not
state. Deliberate extensions where transformers loses information: a llama file's `rope_freqs`
tensor (Llama 3.x) becomes the `llama3` rope scaling it encodes; gemma2's soft-capping values are
read from the metadata (they equal transformers' defaults in every released file); an
`output.weight` is always kept as lm_head. The header is parsed here with `struct` (the gguf
package's reader takes 10-40 s on Gemma's 262k-token vocabulary); tensors are dequantised with
`gguf.quants.dequantize`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import struct

import numpy as np

from prunesae_jax.errors import InputError, MissingFileError, first_nonfinite
from prunesae_jax.models.config import HF_ARCHITECTURES

# GGUF `general.architecture` -> HF model_type.
ARCHITECTURES = {'llama': 'llama', 'gemma2': 'gemma2', 'gemma3': 'gemma3_text'}

_GLOBAL_NAMES = {
    'token_embd.weight': 'model.embed_tokens.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',
}
_BLOCK_NAMES = {
    'attn_norm': 'input_layernorm',
    'attn_q': 'self_attn.q_proj',
    'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj',
    'attn_q_norm': 'self_attn.q_norm',
    'attn_k_norm': 'self_attn.k_norm',
    'ffn_gate': 'mlp.gate_proj',
    'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj',
}
# The pre-MLP norm is `ffn_norm` in every family but its HF name differs; gemma adds post-norms.
_LLAMA_BLOCK_NAMES = {'ffn_norm': 'post_attention_layernorm'}
_GEMMA_BLOCK_NAMES = {
    'ffn_norm': 'pre_feedforward_layernorm',
    'post_attention_norm': 'post_attention_layernorm',
    'post_ffw_norm': 'post_feedforward_layernorm',
}
_BLOCK_RE = re.compile(r'blk\.(\d+)\.(\w+)\.weight')
_GGUF_MAGIC = b'GGUF'


def _hf_name(gguf_name: str, model_type: str) -> str | None:
    """HF state-dict key of a GGUF tensor, or None for one transformers does not load."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None:
        return None
    names = {**_BLOCK_NAMES, **(_LLAMA_BLOCK_NAMES if model_type == 'llama' else _GEMMA_BLOCK_NAMES)}
    part = names.get(m.group(2))
    return None if part is None else f'model.layers.{m.group(1)}.{part}.weight'


# GGUF metadata value types: id -> struct format (8 = string and 9 = array are handled apart).
_SCALAR_FMT = {0: '<B', 1: '<b', 2: '<H', 3: '<h', 4: '<I', 5: '<i', 6: '<f', 7: '<?', 10: '<Q', 11: '<q', 12: '<d'}
_NUMPY_DTYPE = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file: `data` is the raw bytes [rows..., row_bytes] (a view of the memmap)."""

    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), i.e. GGML's ne reversed
    qtype: int  # gguf.GGMLQuantizationType value
    data: np.ndarray


class _Parser:
    """A minimal little-endian GGUF v2/v3 parser over a memory map.

    gguf.GGUFReader builds numpy views for every metadata element, which takes 10-40 s on Gemma's
    262k-token vocabulary; we parse the header with struct (well under a second) and hand the
    tensor bytes to `gguf.quants.dequantize`.
    """

    def __init__(self, path: str):
        self.path = path
        self.buf = np.memmap(path, dtype=np.uint8, mode='r')
        self.mv = memoryview(self.buf)
        self.offs = 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.offs + size > len(self.mv):
            raise InputError(f'header ends at byte {len(self.mv)} while reading byte {self.offs + size}')
        (v,) = struct.unpack_from(fmt, self.mv, self.offs)
        self.offs += size
        return v

    def string(self) -> str:
        n = self.take('<Q')
        if self.offs + n > len(self.mv):
            raise InputError(f'string of {n} bytes at byte {self.offs} runs past the end ({len(self.mv)})')
        s = bytes(self.mv[self.offs : self.offs + n]).decode('utf-8', errors='replace')
        self.offs += n
        return s

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, n = self.take('<I'), self.take('<Q')
            if etype in _NUMPY_DTYPE:
                dt = np.dtype(_NUMPY_DTYPE[etype]).newbyteorder('<')
                end = self.offs + n * dt.itemsize
                if end > len(self.mv):
                    raise InputError(f'array of {n} items at byte {self.offs} runs past the end ({len(self.mv)})')
                arr = np.frombuffer(self.mv[self.offs : end], dtype=dt)
                self.offs = end
                return arr
            return [self.value(etype) for _ in range(n)]
        if vtype not in _SCALAR_FMT:
            raise InputError(f'unknown metadata value type {vtype} at byte {self.offs}')
        return self.take(_SCALAR_FMT[vtype])


def _open(path) -> tuple[dict, list[GGUFTensorInfo]]:
    """(metadata, tensors) of a GGUF file, with one-line errors for a missing, foreign or damaged file."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f'GGUF file {path!r} does not exist; expected a path to a .gguf file')
    with open(path, 'rb') as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise InputError(f'{path!r} starts with {magic!r}, not a GGUF file; expected the magic {_GGUF_MAGIC!r}')
    p = _Parser(path)
    try:
        p.offs = 4
        version = p.take('<I')
        if version not in (2, 3):
            raise InputError(f'GGUF version {version} (expected 2 or 3)')
        n_tensors, n_kv = p.take('<Q'), p.take('<Q')
        metadata = {}
        for _ in range(n_kv):
            key = p.string()
            metadata[key] = p.value(p.take('<I'))
        infos = []
        for _ in range(n_tensors):
            name = p.string()
            ne = [p.take('<Q') for _ in range(p.take('<I'))]
            infos.append((name, ne, p.take('<I'), p.take('<Q')))
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise InputError(
            f'{path!r} has a damaged or truncated GGUF header ({e}); expected a complete GGUF v2/v3 file'
        ) from None
    align = int(metadata.get('general.alignment', 32))
    start = (p.offs + align - 1) // align * align
    size = len(p.buf)
    tensors = []
    for name, ne, qtype, offset in infos:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise InputError(
                f'tensor {name!r} in {path!r} has unknown GGML type {qtype}; expected one of '
                f'{sorted(t.name for t in gguf.GGML_QUANT_SIZES)}'
            ) from None
        row_bytes = ne[0] // block * type_size
        n_bytes = row_bytes * int(np.prod(ne[1:], dtype=np.int64))
        lo = start + offset
        if lo + n_bytes > size:
            raise InputError(
                f'{path!r} is truncated: tensor {name!r} needs bytes up to {lo + n_bytes} but the '
                f'file has {size}; expected a complete GGUF file'
            )
        shape = tuple(int(n) for n in reversed(ne))
        data = p.buf[lo : lo + n_bytes].reshape(*shape[:-1], row_bytes)
        tensors.append(GGUFTensorInfo(name, shape, qtype, data))
    return metadata, tensors


def read_metadata(path) -> dict:
    """The GGUF's metadata key/value pairs (tokenizer arrays included), without reading tensor data."""
    metadata, _ = _open(path)
    return metadata


def _rope_scaling_from_freqs(rope_freqs: np.ndarray, rope_theta: float, head_dim: int) -> dict:
    """The llama3 rope scaling whose per-frequency divisors llama.cpp stored as `rope_freqs`.

    llama.cpp writes factors from (factor, low_freq_factor=1, high_freq_factor=4, original context
    8192) in Llama 3.x conversions; we recover `factor` as the largest divisor and check the rest.
    """
    rope_freqs = np.asarray(rope_freqs, np.float64).reshape(-1)
    scaling = {
        'rope_type': 'llama3',
        'factor': float(np.float32(rope_freqs.max())),
        'low_freq_factor': 1.0,
        'high_freq_factor': 4.0,
        'original_max_position_embeddings': 8192,
    }
    freqs = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    old, lo, hi, factor = 8192.0, 1.0, 4.0, scaling['factor']
    expected = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            expected.append(1.0)
        elif wavelen > old / lo:
            expected.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            expected.append(1.0 / ((1 - smooth) / factor + smooth))
    if rope_freqs.shape != (head_dim // 2,) or not np.allclose(rope_freqs, expected, rtol=1e-4, atol=1e-6):
        raise InputError(
            f'rope_freqs tensor of shape {rope_freqs.shape} matches no llama3 rope scaling '
            f'(factor={factor}, low=1, high=4, original context 8192); expected Llama 3.x factors'
        )
    return scaling


def _hf_config(metadata: dict, tensors: dict[str, GGUFTensorInfo], arch: str) -> dict:
    """The HF config dict transformers rebuilds from this file (its defaults where the file is silent)."""
    model_type = ARCHITECTURES[arch]
    key = lambda name, default=None: metadata.get(f'{arch}.{name}', default)  # noqa: E731

    missing = [
        k for k in ('embedding_length', 'block_count', 'feed_forward_length', 'attention.head_count') if key(k) is None
    ]
    if missing:
        raise InputError(f'GGUF metadata lacks {[f"{arch}.{k}" for k in missing]}; expected every model shape key')
    hidden = int(key('embedding_length'))
    heads = int(key('attention.head_count'))
    layers = int(key('block_count'))
    vocab = key('vocab_size')
    if vocab is None:  # transformers takes the tokenizer's length when the arch key is absent
        tokens = metadata.get('tokenizer.ggml.tokens')
        if tokens is not None:
            vocab = len(tokens)
        elif 'token_embd.weight' in tensors:
            vocab = tensors['token_embd.weight'].shape[0]
        else:
            raise InputError(
                f'GGUF file has neither {arch}.vocab_size, tokenizer.ggml.tokens nor token_embd.weight; '
                'expected one of them to size the vocabulary'
            )
    gemma = model_type != 'llama'
    tok = lambda name, default: metadata.get(f'tokenizer.ggml.{name}', default)  # noqa: E731

    c = {
        'architectures': [HF_ARCHITECTURES[model_type]],
        'model_type': model_type,
        'vocab_size': int(vocab),
        'hidden_size': hidden,
        'intermediate_size': int(key('feed_forward_length')),
        'num_hidden_layers': layers,
        'num_attention_heads': heads,
        # llama.cpp omits head_count_kv when it equals head_count
        'num_key_value_heads': int(key('attention.head_count_kv', heads)),
        'max_position_embeddings': int(
            key('context_length', 8192 if model_type == 'gemma2' else 131_072 if model_type == 'gemma3_text' else 2048)
        ),
        'rms_norm_eps': float(key('attention.layer_norm_rms_epsilon', 1e-6)),
        'tie_word_embeddings': 'output.weight' not in tensors,
        'bos_token_id': tok('bos_token_id', 2 if gemma else 1),
        'eos_token_id': tok('eos_token_id', 1 if gemma else 2),
        'pad_token_id': tok('padding_token_id', 0 if gemma else None),
        'attention_bias': False,
        'torch_dtype': 'float32',
    }
    if tok('unknown_token_id', None) is not None:
        c['unk_token_id'] = tok('unknown_token_id', None)

    if model_type == 'llama':
        c['head_dim'] = int(key('rope.dimension_count', hidden // heads))
        c['hidden_act'] = 'silu'
        c['mlp_bias'] = False
        theta = float(key('rope.freq_base', 10_000.0))
        rope = {'rope_type': 'default', 'rope_theta': theta}
        if 'rope_freqs.weight' in tensors:
            freqs = _dequantize(tensors['rope_freqs.weight'])
            rope = {**_rope_scaling_from_freqs(freqs, theta, c['head_dim']), 'rope_theta': theta}
        elif key('rope.scaling.type') == 'linear':
            rope = {'rope_type': 'linear', 'factor': float(key('rope.scaling.factor')), 'rope_theta': theta}
        c['rope_theta'] = theta
        if rope['rope_type'] != 'default':
            c['rope_scaling'] = {k: v for k, v in rope.items() if k != 'rope_theta'}
        c['rope_parameters'] = rope
        return c

    c['head_dim'] = int(key('attention.key_length', 256))
    c['hidden_activation'] = 'gelu_pytorch_tanh'
    c['hidden_act'] = 'gelu_pytorch_tanh'
    # transformers reads no scalar from the file: Gemma's config default (256) holds for 2B/9B/270M/1B.
    c['query_pre_attn_scalar'] = 256
    c['sliding_window'] = int(key('attention.sliding_window', 4096))
    if model_type == 'gemma2':
        c['rope_theta'] = float(key('rope.freq_base', 10_000.0))
        c['rope_parameters'] = {'rope_type': 'default', 'rope_theta': c['rope_theta']}
        c['attn_logit_softcapping'] = float(key('attn_logit_softcapping', 50.0))
        c['final_logit_softcapping'] = float(key('final_logit_softcapping', 30.0))
        c['layer_types'] = ['sliding_attention' if (i + 1) % 2 else 'full_attention' for i in range(layers)]
    else:
        c['rope_theta'] = float(key('rope.freq_base', 1_000_000.0))
        c['rope_local_base_freq'] = 10_000.0
        c['rope_parameters'] = {
            'full_attention': {'rope_type': 'default', 'rope_theta': c['rope_theta']},
            'sliding_attention': {'rope_type': 'default', 'rope_theta': 10_000.0},
        }
        c['attn_logit_softcapping'] = None
        c['final_logit_softcapping'] = None
        c['layer_types'] = ['sliding_attention' if (i + 1) % 6 else 'full_attention' for i in range(layers)]
        c['sliding_window_pattern'] = 6
    return c


# GGML integer tensor types (I8 / I16 / I32 / I64): dequantising them would silently cast integers to weights.
_INTEGER_QTYPES = (24, 25, 26, 27)


def _type_name(qtype: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(qtype).name
    except ValueError:
        return str(qtype)


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (rotate-half pairs <- interleaved pairs). w: [n_head*hd, D]."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t: GGUFTensorInfo) -> np.ndarray:
    """float32 values of a tensor, in numpy order (t.shape)."""
    import gguf

    w = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(t.qtype))
    return np.asarray(w, dtype=np.float32).reshape(t.shape)


def read_gguf(path) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads a GGUF file into (HF config dict, HF state dict of float32 numpy arrays).

    Tensor names and layout are transformers' ('model.layers.0.self_attn.q_proj.weight', [out, in]);
    the values equal what transformers loads from the same file. No `lm_head.weight` when tied.
    Accepted architectures: llama, gemma2, gemma3 (text).
    """
    metadata, tensor_list = _open(path)
    tensors = {t.name: t for t in tensor_list}
    arch = metadata.get('general.architecture')
    if arch not in ARCHITECTURES:
        raise InputError(
            f'GGUF architecture {arch!r} in {os.fspath(path)!r} is not supported; supported: {sorted(ARCHITECTURES)}'
        )
    hf_config = _hf_config(metadata, tensors, arch)
    model_type = hf_config['model_type']
    H, KV = hf_config['num_attention_heads'], hf_config['num_key_value_heads']

    state_dict: dict[str, np.ndarray] = {}
    for t in tensor_list:
        name = _hf_name(t.name, model_type)
        if name is None:
            if t.name == 'rope_freqs.weight':
                continue  # folded into the config's rope scaling above
            raise InputError(
                f'GGUF tensor {t.name!r} has no Hugging Face {model_type} counterpart; expected '
                f'token_embd/output_norm/output or blk.N.{{{",".join(_BLOCK_NAMES)},ffn_norm,...}}'
            )
        if t.qtype in _INTEGER_QTYPES:
            raise InputError(
                f'GGUF tensor {t.name!r} in {os.fspath(path)!r} is stored as integer type '
                f'{_type_name(t.qtype)}; accepted: float (F32/F16/BF16/F64) or quantised weights'
            )
        w = _dequantize(t)
        bad = first_nonfinite(w)
        if bad:
            n_bad, idx = bad
            raise InputError(
                f'GGUF tensor {t.name!r} in {os.fspath(path)!r} holds {n_bad} '
                f'non-finite value(s), first {float(w[idx])} at index {idx}; accepted: finite weights'
            )
        if model_type == 'llama' and t.name.endswith(('.attn_q.weight', '.attn_k.weight')):
            w = _unpermute_qk(w, H if '.attn_q.' in t.name else KV)
        elif model_type != 'llama' and t.name.endswith('norm.weight'):
            w = w - np.float32(1.0)
        state_dict[name] = np.ascontiguousarray(w)
    return hf_config, state_dict


def load_gguf(path, dtype: str = 'float32'):
    """(cfg, params) of the decoder in a GGUF file: `read_gguf` then `convert.from_hf_state_dict`."""
    from prunesae_jax.models import convert

    hf_config, state_dict = read_gguf(path)
    return convert.from_hf_state_dict(hf_config, state_dict, dtype=dtype)
