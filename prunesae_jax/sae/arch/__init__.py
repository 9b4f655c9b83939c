"""SAE architectures, registered by name (as SAELens's `register_sae_class`): a new architecture is one
new module here that subclasses `Architecture`, decorates it with `@register('name')` and is imported
below.

Each architecture says how its latents are computed from the encoder pre-activations (`encode`, the
inference rule), what its training loss is (`loss`), which extra params it has (`init_extra`), and,
where it needs them, a hand-written gradient (`loss_and_grads`) and a post-update rule for
non-gradient params (`after_update`). The shared maths is in prunesae_jax/sae/common.py, the
hand-written gradients in prunesae_jax/sae/kernels.py.
"""

from __future__ import annotations

import abc
from typing import Any

from prunesae_jax.errors import InputError
from prunesae_jax.sae import common

_REGISTRY: dict[str, 'Architecture'] = {}


class Architecture(abc.ABC):
    """What differs between SAE architectures; subclasses override what their architecture needs.

    Every method works on the params of ONE SAE (no seed axis) and on cfg, an SAEConfig.
    """

    name: str = ''
    has_threshold: bool = False  # params['threshold'] [n] exists
    uses_k: bool = False  # SAEConfig.k is the architecture's sparsity (1 <= k <= n_latents)
    uses_auxk: bool = False  # the loss has the AuxK term (TrainResult counts its steps)

    def init_extra(self, cfg) -> dict[str, Any]:
        """Params beyond W_enc, b_enc, W_dec, b_dec at init."""
        del cfg
        return {}

    @abc.abstractmethod
    def encode(self, cfg, params, pre):
        """Latent activations z [B, n] from the pre-activations pre [B, n] (the inference rule)."""

    @abc.abstractmethod
    def loss(self, cfg, params, x, dead, use_aux: bool = True):
        """(loss, aux) of one SAE on a batch x [B, d_in]; dead [n] bool marks dead latents (AuxK).

        aux holds mse (mean squared error per element), l0, fire_count [n] (tokens that fired each
        latent), x_hat and whatever the architecture's after_update reads.
        """

    def reconstruct(self, cfg, params, x):
        """x_hat [B, d_in] of float32 activations x [B, d_in] with the inference rule."""
        common.check_d_in(cfg, x)
        return common.decode(cfg, params, self.encode(cfg, params, common.pre_acts(cfg, params, x)))

    # (loss, aux, grads) written out by hand, or None: the training step then differentiates loss
    loss_and_grads = None

    def after_update(self, cfg, params, new, aux, ok, step, threshold_start):
        """The params after the training step's Adam update, for params Adam does not train alone.

        params / new: all seeds' params before / after Adam (seed axis first); aux: the step's aux
        (seed axis first); ok [S]: seeds whose loss was finite; step: the 0-based step;
        threshold_start: train.batchtopk_threshold_start's step.
        """
        del cfg, params, aux, ok, step, threshold_start
        return new


def register(name: str):
    """Class decorator: registers an Architecture subclass under `name`."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f'SAE architecture {name!r} is registered twice')
        cls.name = name
        _REGISTRY[name] = cls()
        return cls

    return wrap


def get(name: str) -> Architecture:
    """The registered architecture `name`; InputError naming the accepted ones otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise InputError(f'architecture={name!r}; accepted: {names()}')
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered architecture names, in registration order."""
    return tuple(_REGISTRY)


# pylint: disable=g-import-not-at-top,wrong-import-position
from prunesae_jax.sae.arch import batchtopk, jumprelu, relu, topk  # noqa: E402,F401  (registration order)

ARCHITECTURES = names()
