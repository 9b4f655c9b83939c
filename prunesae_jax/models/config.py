"""The decoder configuration shared by the Llama, Gemma 2 and Gemma 3 (text) families.

One frozen, hashable dataclass drives one decoder implementation (models/decoder.py); every
family difference is a field of it, and the decoder branches on those fields only, never on
`family`. A switch left None is filled from the family (FAMILY_SWITCHES), so a new family is a
new row there (plus its Hugging Face names in models/convert.py), not new decoder code.
`family` itself only names the Hugging Face architecture the config is read from and exported as.
`DecoderConfig.from_hf` reads a Hugging Face config (dict or `PretrainedConfig`, old
`rope_theta`/`rope_scaling` keys or the newer `rope_parameters`); `to_hf_dict` writes one back
with both sets of RoPE keys, so transformers 4.x and 5.x read the same model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prunesae_jax.errors import InputError

# The linear layers inside decoder blocks; the only weights pruning may zero.
PRUNABLE = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')

FAMILIES = ('llama', 'gemma2', 'gemma3_text')
LAYER_TYPES = ('sliding_attention', 'full_attention')
DTYPES = ('float32', 'bfloat16', 'float16')
ROPE_TYPES = ('default', 'linear', 'llama3')
HIDDEN_ACTS = ('silu', 'gelu_pytorch_tanh')

# The switches each family's Hugging Face architecture hard-codes; DecoderConfig fills a switch
# left None from its family's row. gemma3_text also defaults rope_local_theta (its sliding layers'
# RoPE base), which the other families leave None (every layer uses rope_theta).
SWITCHES = ('norm_plus_one', 'post_norms', 'qk_norm', 'scale_embeddings')
FAMILY_SWITCHES = {
    'llama': {'norm_plus_one': False, 'post_norms': False, 'qk_norm': False, 'scale_embeddings': False},
    'gemma2': {'norm_plus_one': True, 'post_norms': True, 'qk_norm': False, 'scale_embeddings': True},
    'gemma3_text': {
        'norm_plus_one': True,
        'post_norms': True,
        'qk_norm': True,
        'scale_embeddings': True,
        'rope_local_theta': 10_000.0,
    },
}
# Fields a family's Hugging Face architecture has no setting for: they must be None to export it.
# (HF's Gemma 3 attention never applies attn_logit_softcapping, Gemma 2's does.)
_HF_UNSET = {
    'llama': (
        'rope_local_theta',
        'sliding_window',
        'attn_logit_softcapping',
        'final_logit_softcapping',
        'query_pre_attn_scalar',
    ),
    'gemma2': ('rope_local_theta',),
    'gemma3_text': ('attn_logit_softcapping',),
}

# The transformers class of each family (config.json's `architectures`).
HF_ARCHITECTURES = {
    'llama': 'LlamaForCausalLM',
    'gemma2': 'Gemma2ForCausalLM',
    'gemma3_text': 'Gemma3ForCausalLM',
}


def _freeze(value):
    """Dicts -> sorted item tuples and lists -> tuples, so the config stays hashable."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a decoder-only LM (hashable, usable as a jit static argument).

    The switches the decoder branches on (llama / gemma2 / gemma3_text):
      norm_plus_one            RMSNorm scales by (1 + w) in float32 (identity at w = 0), else by w
                               after casting back to the activation dtype: False / True / True.
      post_norms               each block also normalises its attention and MLP outputs before the
                               residual add (params post_attn_norm, post_mlp_norm): False / True / True.
      qk_norm                  RMSNorm over head_dim on queries and keys (params q_norm, k_norm):
                               False / False / True.
      scale_embeddings         embeddings times sqrt(D), rounded to the activation dtype first:
                               False / True / True.
      attn_logit_softcapping   cap * tanh(scores / cap) on the attention logits, or None.
      final_logit_softcapping  the same on the output logits, or None.
      query_pre_attn_scalar    attention logits are scaled by its -1/2 power (None: head_dim).
      layer_types, sliding_window  full causal or sliding-window attention per layer.
      rope_local_theta         RoPE base of the sliding layers (without rope_scaling), or None:
                               every layer uses rope_theta and rope_scaling. gemma3_text: 10000.
      hidden_act               the gated MLP's activation: 'silu' or 'gelu_pytorch_tanh'.
    The first four and gemma3_text's rope_local_theta are filled from FAMILY_SWITCHES when None.

    rope_scaling is None or a sorted tuple of (key, value) items with at least 'rope_type'
    ('linear' with 'factor'; 'llama3' with 'factor', 'low_freq_factor', 'high_freq_factor',
    'original_max_position_embeddings'). It applies to the layers that use rope_theta.
    """

    family: str
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # KV
    head_dim: int  # hd
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0  # full-attention layers; every layer when rope_local_theta is None
    rope_local_theta: float | None = None  # sliding layers (gemma3)
    rope_scaling: tuple | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None  # None -> head_dim
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = 'float32'
    hidden_act: str = 'silu'
    max_position_embeddings: int = 8192
    norm_plus_one: bool | None = None
    post_norms: bool | None = None
    qk_norm: bool | None = None
    scale_embeddings: bool | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise InputError(f'family={self.family!r} is not supported; expected one of {FAMILIES}')
        for name, value in FAMILY_SWITCHES[self.family].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in SWITCHES:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise InputError(f'{name}={v!r} is not accepted; expected True, False or None (the family default)')
        if self.dtype not in DTYPES:
            raise InputError(f'dtype={self.dtype!r} is not supported; expected one of {DTYPES}')
        if self.hidden_act not in HIDDEN_ACTS:
            raise InputError(f'hidden_act={self.hidden_act!r} is not supported; expected one of {HIDDEN_ACTS}')
        for name in (
            'vocab_size',
            'hidden_size',
            'intermediate_size',
            'num_layers',
            'num_heads',
            'num_kv_heads',
            'head_dim',
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InputError(f'{name}={v!r} must be a positive int')
        if self.num_heads % self.num_kv_heads:
            raise InputError(f'num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}')
        # Normalise containers so equal configs hash equally.
        layer_types = tuple(self.layer_types) if self.layer_types else ('full_attention',) * self.num_layers
        object.__setattr__(self, 'layer_types', layer_types)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, 'eos_token_id', tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, 'rope_scaling', _freeze(self.rope_scaling))
        if len(layer_types) != self.num_layers:
            raise InputError(f'layer_types has {len(layer_types)} entries; expected num_layers={self.num_layers}')
        bad = sorted(set(layer_types) - set(LAYER_TYPES))
        if bad:
            raise InputError(f'layer_types contains {bad}; expected entries of {LAYER_TYPES}')
        if 'sliding_attention' in layer_types and not self.sliding_window:
            raise InputError(f'sliding_window={self.sliding_window!r} must be a positive int when sliding layers exist')
        if self.rope_scaling is not None:
            rtype = dict(self.rope_scaling).get('rope_type')
            if rtype not in ROPE_TYPES:
                raise InputError(f'rope_scaling rope_type={rtype!r} is not supported; expected one of {ROPE_TYPES}')

    # ---- derived values ----
    @property
    def attn_scale(self) -> float:
        """The factor on the attention logits: query_pre_attn_scalar ** -0.5 (head_dim when None)."""
        s = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return float(s) ** -0.5

    def rope_for_layer(self, i: int) -> tuple[float, dict | None]:
        """(base, scaling dict or None) of the rotary embedding used by layer i."""
        if self.rope_local_theta is not None and self.layer_types[i] == 'sliding_attention':
            return float(self.rope_local_theta), None
        return float(self.rope_theta), (dict(self.rope_scaling) if self.rope_scaling else None)

    def replace(self, **changes) -> 'DecoderConfig':
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face interop ----
    @classmethod
    def from_hf(cls, hf_config: Any, dtype: str = 'float32') -> 'DecoderConfig':
        """Builds a config from a HF config dict (config.json) or `transformers.PretrainedConfig`."""
        if not isinstance(hf_config, dict):
            if not hasattr(hf_config, 'to_dict'):
                raise InputError(
                    f'hf_config of type {type(hf_config).__name__} is not accepted; '
                    'expected a dict or a transformers PretrainedConfig'
                )
            hf_config = hf_config.to_dict()
        c = dict(hf_config)
        model_type = c.get('model_type')
        if model_type == 'gemma3' and isinstance(c.get('text_config'), dict):
            # A multimodal Gemma 3 config: the language model is its text_config.
            c = dict(c['text_config'])
            c.setdefault('model_type', 'gemma3_text')
            model_type = c['model_type']
        if model_type not in FAMILIES:
            raise InputError(f'model_type={model_type!r} is not supported; supported: {FAMILIES}')
        for flag in ('attention_bias', 'mlp_bias'):
            if c.get(flag):
                raise InputError(f'{flag}=True is not supported; only bias-free linear layers are')
        required = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads')
        missing = [k for k in required if c.get(k) is None]
        if missing:
            raise InputError(
                f'HF config lacks {missing}; accepted: a {model_type} config.json stating {list(required)}'
            )
        for k in required + ('num_key_value_heads', 'head_dim', 'max_position_embeddings', 'sliding_window'):
            v = c.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InputError(f'HF config {k}={v!r}; accepted: a non-negative int')

        L = int(c['num_hidden_layers'])
        D = int(c['hidden_size'])
        H = int(c['num_attention_heads'])
        KV = int(c.get('num_key_value_heads') or H)
        hd = int(c.get('head_dim') or D // H)
        act = c.get('hidden_activation') or c.get('hidden_act') or 'silu'
        if model_type != 'llama' and act in ('gelu', 'gelu_pytorch_tanh'):
            act = 'gelu_pytorch_tanh'  # gemma checkpoints state 'gelu' but HF runs the tanh approximation

        # RoPE: newer configs nest everything in rope_parameters (per layer type for gemma3).
        rp = c.get('rope_parameters') or {}
        nested = isinstance(rp, dict) and any(k in LAYER_TYPES for k in rp)
        if nested:
            glob = dict(rp.get('full_attention') or {})
            loc = dict(rp.get('sliding_attention') or {})
        else:
            glob = dict(rp) if rp else {}
            if c.get('rope_scaling'):
                glob = {**glob, **c['rope_scaling']}
            loc = {}
        default_theta = 1_000_000.0 if model_type == 'gemma3_text' else 10_000.0
        rope_theta = float(glob.get('rope_theta', c.get('rope_theta', default_theta)) or default_theta)
        rope_local_theta = None
        if model_type == 'gemma3_text':
            rope_local_theta = float(loc.get('rope_theta', c.get('rope_local_base_freq', 10_000.0)))
            if loc.get('rope_type', 'default') != 'default':
                raise InputError(
                    f"sliding-layer rope_type={loc.get('rope_type')!r} is not supported; expected 'default'"
                )
        rtype = glob.get('rope_type', glob.get('type', 'default'))
        rope_scaling = None
        if rtype != 'default':
            scal = {k: v for k, v in glob.items() if k not in ('rope_theta', 'type', 'partial_rotary_factor')}
            scal['rope_type'] = rtype
            if rtype == 'llama3':
                scal.setdefault('original_max_position_embeddings', c.get('max_position_embeddings', 8192))
            rope_scaling = _freeze(scal)
        if float(glob.get('partial_rotary_factor', 1.0)) != 1.0:
            raise InputError(f'partial_rotary_factor={glob["partial_rotary_factor"]} is not supported; expected 1.0')

        if model_type == 'llama':
            layer_types = ('full_attention',) * L
            sliding_window = None
        else:
            layer_types = c.get('layer_types')
            if not layer_types:
                pattern = 2 if model_type == 'gemma2' else int(c.get('sliding_window_pattern') or 6)
                layer_types = ['sliding_attention' if (i + 1) % pattern else 'full_attention' for i in range(L)]
            layer_types = tuple(layer_types)
            sliding_window = c.get('sliding_window')
            if c.get('use_bidirectional_attention'):
                raise InputError('use_bidirectional_attention=True is not supported; expected a causal decoder')

        qpas = c.get('query_pre_attn_scalar') if model_type != 'llama' else None
        eos = c.get('eos_token_id')
        tie_default = model_type != 'llama'
        return cls(
            family=model_type,
            vocab_size=int(c['vocab_size']),
            hidden_size=D,
            intermediate_size=int(c['intermediate_size']),
            num_layers=L,
            num_heads=H,
            num_kv_heads=KV,
            head_dim=hd,
            rms_norm_eps=float(c.get('rms_norm_eps', 1e-6)),
            rope_theta=rope_theta,
            rope_local_theta=rope_local_theta,
            rope_scaling=rope_scaling,
            sliding_window=int(sliding_window) if sliding_window else None,
            layer_types=layer_types,
            # HF's Gemma 3 attention never applies attn_logit_softcapping (Gemma 2's does); follow it.
            attn_logit_softcapping=(
                float(c['attn_logit_softcapping'])
                if model_type == 'gemma2' and c.get('attn_logit_softcapping')
                else None
            ),
            final_logit_softcapping=(
                float(c['final_logit_softcapping'])
                if model_type != 'llama' and c.get('final_logit_softcapping')
                else None
            ),
            query_pre_attn_scalar=float(qpas) if qpas is not None else None,
            tie_word_embeddings=bool(c.get('tie_word_embeddings', tie_default)),
            bos_token_id=c.get('bos_token_id'),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=c.get('pad_token_id'),
            dtype=dtype,
            hidden_act=act,
            max_position_embeddings=int(c.get('max_position_embeddings') or 8192),
        )

    def to_hf_dict(self) -> dict:
        """A config.json dict that every transformers version pyproject allows loads into the *ForCausalLM.

        RoPE is written twice, consistently: transformers >= 5 reads `rope_parameters` (per layer type
        for gemma3), transformers 4.x ignores that key and reads the legacy `rope_theta` /
        `rope_scaling` (and gemma3's `rope_local_base_freq`) instead, so writing only one of them
        would silently run the other versions with their default RoPE base.
        InputError when a switch differs from what the family's HF architecture hard-codes
        (FAMILY_SWITCHES, _HF_UNSET): transformers would run another model than `forward`.
        """
        arch = HF_ARCHITECTURES[self.family]
        for name in SWITCHES:
            want = FAMILY_SWITCHES[self.family][name]
            if getattr(self, name) != want:
                raise InputError(
                    f'{name}={getattr(self, name)} cannot be exported as {arch}; '
                    f'accepted: {name}={want} for family={self.family!r}'
                )
        for name in _HF_UNSET[self.family]:
            if getattr(self, name) is not None:
                raise InputError(
                    f'{name}={getattr(self, name)!r} cannot be exported as {arch}, '
                    f'which has no such setting; accepted: None for family={self.family!r}'
                )
        glob = {'rope_type': 'default', 'rope_theta': self.rope_theta}
        if self.rope_scaling:
            glob.update(dict(self.rope_scaling))
        legacy_scaling = dict(self.rope_scaling) if self.rope_scaling else None
        d: dict[str, Any] = {
            'architectures': [HF_ARCHITECTURES[self.family]],
            'model_type': self.family,
            'vocab_size': self.vocab_size,
            'hidden_size': self.hidden_size,
            'intermediate_size': self.intermediate_size,
            'num_hidden_layers': self.num_layers,
            'num_attention_heads': self.num_heads,
            'num_key_value_heads': self.num_kv_heads,
            'head_dim': self.head_dim,
            'rms_norm_eps': self.rms_norm_eps,
            'max_position_embeddings': self.max_position_embeddings,
            'tie_word_embeddings': self.tie_word_embeddings,
            'bos_token_id': self.bos_token_id,
            'eos_token_id': list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            'pad_token_id': self.pad_token_id,
            'attention_bias': False,
            'torch_dtype': self.dtype,
            'dtype': self.dtype,
            # legacy RoPE keys (transformers 4.x), the same values as rope_parameters below
            'rope_theta': self.rope_theta,
        }
        if self.family == 'llama':
            d['hidden_act'] = self.hidden_act
            d['mlp_bias'] = False
            d['rope_scaling'] = legacy_scaling
            d['rope_parameters'] = glob
        else:
            d['hidden_activation'] = self.hidden_act
            d['hidden_act'] = self.hidden_act
            qpas = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
            # HF declares this an int; keep integral values ints so its strict config accepts them.
            d['query_pre_attn_scalar'] = int(qpas) if float(qpas).is_integer() else qpas
            d['sliding_window'] = self.sliding_window
            d['layer_types'] = list(self.layer_types)
            d['attn_logit_softcapping'] = self.attn_logit_softcapping
            d['final_logit_softcapping'] = self.final_logit_softcapping
            if self.family == 'gemma3_text':
                d['rope_local_base_freq'] = self.rope_local_theta
                d['rope_scaling'] = legacy_scaling
                d['rope_parameters'] = {
                    'full_attention': glob,
                    'sliding_attention': {'rope_type': 'default', 'rope_theta': self.rope_local_theta},
                }
            else:
                if legacy_scaling:
                    d['rope_scaling'] = legacy_scaling
                d['rope_parameters'] = glob
        return d
