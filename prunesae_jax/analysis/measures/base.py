"""What every measure reads and how it is registered: `Dense`, `Condition`, `Settings`, `register`.

A measure answers one research question for one condition against the dense condition:

    @register('stability')
    def stability(dense: Dense, cond: Condition) -> dict | None: ...

`Dense` and `Condition` hold arrays and plain values only (decoders, training records, firing
rates, causal effects, the transfer dictionary, the params and tokens a forward pass needs), so a
measure runs on small arrays in a test exactly as in the study. Results are plain JSON values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from prunesae_jax.analysis.checks import check_finite
from prunesae_jax.errors import InputError

__all__ = ['Settings', 'Dense', 'Condition', 'Measure', 'MEASURES', 'register', 'interval_dict', 'decoder_stack']


@dataclasses.dataclass(frozen=True)
class Settings:
    """The analysis settings every measure reads (the study's config.analysis, as plain values).

    tau / taus: cosine thresholds of a match (taus: the robustness levels); pairing: 'distinct'
    (every pair of dense and pruned seeds, different inits) or 'shared' (seed s with seed s, one
    init); n_bootstrap / ci / seed: the percentile bootstrap; min_firings / n_quintiles: fragility's
    firing-rate bins; causal_measure: 'exact' (the exactly ablated features) or 'attribution' (the
    gradient x activation estimate of every feature); batch_size: sequences per forward pass of the transfer measure.
    """

    tau: float = 0.7
    taus: tuple[float, ...] = (0.6, 0.7, 0.8)
    pairing: str = 'distinct'
    n_bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0
    min_firings: int = 10
    n_quintiles: int = 5
    causal_measure: str = 'attribution'
    batch_size: int = 8

    @property
    def boot(self) -> dict[str, Any]:
        """Keyword arguments of the bootstrap functions (at least one resample)."""
        return dict(n_boot=max(self.n_bootstrap, 1), ci=self.ci, seed=self.seed)


@dataclasses.dataclass(eq=False)
class Dense:
    """The dense condition, which every condition is compared with.

    W_dec [S, n, d]: its SAEs' decoders. training: its training record (final.json of the SAE
    stage: n_steps, batch_size, ...; 'firing_rate' [S, n] over the training tokens). causal: the
    causal effects of seed 0's features (analysis.measures.causal.dense_effects; None where no
    measure needs them). dictionary: (SAEConfig, params, name) of the fixed transfer dictionary.
    heldout_x [N, d]: the dense model's resid_post on the transfer tokens, BOS excluded.
    W_init [S, n, d]: the untrained decoders of the dense seeds (the init-only null of
    pairing='shared'; None otherwise).
    """

    W_dec: np.ndarray
    training: dict
    causal: dict | None = None
    dictionary: tuple | None = None
    heldout_x: np.ndarray | None = None
    W_init: np.ndarray | None = None


@dataclasses.dataclass(eq=False)
class Condition:
    """One condition (dense, or a method at a sparsity) of one model.

    W_dec [S, n, d] and training: as in Dense. model_cfg, layer, params, heldout [B, T]: the model
    and the held-out token rows the transfer measure runs forwards on. settings: the analysis
    settings. shared: results several measures of this condition read (the seed matching), filled
    on first use by `computed_once`.
    """

    method: str
    sparsity: float
    W_dec: np.ndarray
    training: dict
    settings: Settings = Settings()
    model_cfg: Any = None
    layer: int = 0
    params: Any = None
    heldout: np.ndarray | None = None
    shared: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def is_dense(self) -> bool:
        return self.method == 'dense'

    def computed_once(self, name: str, compute: Callable[[], Any]) -> Any:
        """compute() the first time `name` is asked of this condition, then the same value."""
        if name not in self.shared:
            self.shared[name] = compute()
        return self.shared[name]


Measure = Callable[[Dense, Condition], 'dict | None']

# name -> measure; filled by the @register decorators of the modules in this package.
MEASURES: dict[str, Measure] = {}


def register(name: str) -> Callable[[Measure], Measure]:
    """Registers measure(dense, cond) -> dict | None under `name` (a new measure is one new module)."""

    def add(fn: Measure) -> Measure:
        if name in MEASURES:
            raise InputError(f'measure {name!r} is registered twice; accepted: one measure per name')
        MEASURES[name] = fn
        return fn

    return add


def interval_dict(interval) -> dict[str, float]:
    """{estimate, low, high} of an Interval, as plain floats."""
    return {'estimate': float(interval.estimate), 'low': float(interval.low), 'high': float(interval.high)}


def decoder_stack(decoders, name: str) -> list[np.ndarray]:
    """Decoders of several seeds ([S, n, d], [n, d] or a sequence of [n, d]) as a list of [n, d]."""
    if isinstance(decoders, (list, tuple)):
        mats = [np.asarray(D) for D in decoders]
    else:
        arr = np.asarray(decoders)
        mats = [arr] if arr.ndim == 2 else list(arr) if arr.ndim == 3 else None
        if mats is None:
            raise InputError(f'{name} has shape {arr.shape}; expected [S, n, d], [n, d] or a sequence of [n, d]')
    for k, D in enumerate(mats):
        if D.ndim != 2:
            raise InputError(f'{name} holds a matrix of shape {D.shape}; expected decoder matrices [n, d]')
        check_finite(D, f'{name}[{k}]', 'finite decoder rows')
    return mats
