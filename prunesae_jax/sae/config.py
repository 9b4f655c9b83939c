"""The configs of the SAE stage: SAEConfig (one SAE's architecture) and TrainConfig (how S seeds of it
are trained). Each validates its own fields: a bad value raises InputError naming it and what is
accepted. Both are frozen, hashable dataclasses (usable as jit static args).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from prunesae_jax.errors import InputError
from prunesae_jax.sae import arch


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Architecture of a sparse autoencoder (hashable: usable as a jit static arg)."""

    d_in: int
    n_latents: int
    architecture: str = 'topk'
    k: int = 32  # active latents per token (topk) or per token on average (batchtopk)
    k_aux: int | None = None  # AuxK latents; None -> d_in // 2 (OpenAI)
    aux_coeff: float = 1.0 / 32.0
    # a latent is dead (AuxK) after this many training tokens without firing. None = auto, resolved by
    # train.resolve_dead_tokens from the run's length (a fixed 10M, the papers' value, exceeds what short
    # runs train on: no latent would ever count as dead and AuxK would never run)
    dead_tokens: int | None = None
    l1_coeff: float = 5.0  # relu: decoder-norm-weighted L1
    l0_coeff: float = 1.0  # jumprelu: L0 penalty
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.001
    # batchtopk inference threshold (dictionary_learning's BatchTopKTrainer): an EMA with this momentum of
    # each batch's smallest active pre-activation, updated only on steps after the start step (see
    # train.batchtopk_threshold_start for runs shorter than twice the start step)
    batchtopk_threshold_momentum: float = 0.999
    batchtopk_threshold_start_step: int = 1000
    apply_b_dec_to_input: bool = True  # Gemma Scope SAEs do not subtract b_dec
    unit_norm_decoder: bool = True

    def __post_init__(self):
        spec = arch.get(self.architecture)  # InputError naming the registered architectures
        if int(self.d_in) <= 0 or int(self.n_latents) <= 0:
            raise InputError(f'd_in={self.d_in}, n_latents={self.n_latents}; both must be positive integers')
        if spec.uses_k and not 0 < int(self.k) <= int(self.n_latents):
            raise InputError(f'k={self.k}; accepted: 1 <= k <= n_latents={self.n_latents}')
        if self.k_aux is not None and not 0 < int(self.k_aux) <= int(self.n_latents):
            raise InputError(f'k_aux={self.k_aux}; accepted: 1 <= k_aux <= n_latents={self.n_latents}')
        if self.dead_tokens is not None and (isinstance(self.dead_tokens, bool) or int(self.dead_tokens) < 1):
            raise InputError(f'dead_tokens={self.dead_tokens!r}; accepted: a positive int, or None for auto')
        if not 0.0 <= float(self.batchtopk_threshold_momentum) < 1.0:
            raise InputError(f'batchtopk_threshold_momentum={self.batchtopk_threshold_momentum}; accepted: 0 <= m < 1')
        if int(self.batchtopk_threshold_start_step) < 0:
            raise InputError(f'batchtopk_threshold_start_step={self.batchtopk_threshold_start_step}; accepted: >= 0')

    @property
    def k_aux_eff(self) -> int:
        return int(min(self.k_aux if self.k_aux is not None else max(self.d_in // 2, 1), self.n_latents))

    @property
    def has_threshold(self) -> bool:
        return arch.get(self.architecture).has_threshold

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> 'SAEConfig':
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train S seeds of one SAE config."""

    n_steps: int = 1000
    n_seeds: int = 1
    seed: int = 0  # SAE s is initialised from jax.random.key(seed + s)
    data_seed: int = 0
    batch_size: int = 4096
    lr: float | None = None  # None -> 2e-4 / sqrt(n_latents / 2**14)
    warmup_steps: int = 100
    decay_frac: float = 0.2  # linear decay to 0 over the last 20% of steps
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    per_seed_data: bool = False
    normalize: bool = True  # scale inputs so E||x|| = sqrt(d_in)
    geometric_median_tokens: int = 4096
    checkpoint_every: int = 0  # 0 = no checkpoints
    log_every: int = 50
    eval_tokens: int = 16384
    progress: bool = True
    # TopK: how many seeds one pass of the step computes together (vmapped); the passes run one after
    # another (lax.map). 0 = auto: all seeds on GPU / TPU, one at a time on CPU, where batching seeds
    # saves nothing (S GEMMs batched run at the FLOP rate of S GEMMs in a row) and holds S [B, n]
    # pre-activation arrays at once. Results agree to float rounding either way.
    seeds_per_pass: int = 0
    # convergence snapshots: at step max(1, round(frac * n_steps)) for each frac in (0, 1], train() keeps
    # every seed's decoder W_dec (TrainResult.snapshots; with a workdir also on disk, so they survive a
    # kill and resume). Each costs one host copy of [S, n, d_in] float32 (S x 170 MB at 18432 x 2304).
    snapshot_fracs: tuple[float, ...] = ()

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_real(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ('n_steps', 'n_seeds', 'batch_size', 'geometric_median_tokens', 'eval_tokens'):
            v = getattr(self, name)
            if not is_int(v) or v <= 0:
                raise InputError(f'{name}={v!r}; accepted: a positive int')
        for name in ('seed', 'data_seed', 'warmup_steps', 'checkpoint_every', 'log_every'):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise InputError(f'{name}={v!r}; accepted: an int >= 0')
        if self.lr is not None and (not is_real(self.lr) or self.lr <= 0):
            # a negative rate would train by gradient ascent, 0 would not train at all
            raise InputError(f'lr={self.lr!r}; accepted: a finite learning rate > 0, or None for the default')
        for name in ('adam_b1', 'adam_b2'):
            v = getattr(self, name)
            if not is_real(v) or not 0.0 <= v < 1.0:
                raise InputError(f'{name}={v!r}; accepted: 0 <= {name} < 1')
        if not is_real(self.decay_frac) or not 0.0 <= self.decay_frac <= 1.0:
            raise InputError(f'decay_frac={self.decay_frac!r}; accepted: 0..1')
        if not is_int(self.seeds_per_pass) or self.seeds_per_pass < 0:
            raise InputError(f'seeds_per_pass={self.seeds_per_pass!r}; accepted: 0 (auto) or a positive int')
        fracs = self.snapshot_fracs
        if isinstance(fracs, (str, bytes)) or not hasattr(fracs, '__iter__'):
            raise InputError(f'snapshot_fracs={fracs!r}; accepted: a tuple of fractions in (0, 1]')
        bad = [
            f
            for f in fracs
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0.0 < f <= 1.0
        ]
        if bad:
            raise InputError(
                f'snapshot_fracs={tuple(fracs)!r}: {bad} not in (0, 1]; accepted: fractions of '
                'n_steps in (0, 1], e.g. (0.25, 0.5, 1.0)'
            )
        object.__setattr__(self, 'snapshot_fracs', tuple(float(f) for f in fracs))

    @property
    def snapshot_steps(self) -> tuple[int, ...]:
        """The steps (1..n_steps, sorted, distinct) at which train() snapshots the decoders."""
        return tuple(sorted({max(1, round(f * self.n_steps)) for f in self.snapshot_fracs}))
