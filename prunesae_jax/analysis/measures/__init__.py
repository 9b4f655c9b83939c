"""The research questions as measures, registered by name (docs/method.md defines each one).

Every measure has one signature, `measure(dense: Dense, cond: Condition) -> dict | None` (None: not
defined for this condition, e.g. fragility of the dense condition), and is one module here:

  stability    RQ1  features shared by SAEs of different seeds (the seed floor)
  survival     RQ2  dense features with an MNN match in the condition's SAEs (+ the init-only null)
  transfer     RQ3  the dense dictionary on the condition's activations: FVU, L0, Jaccard, CE recovered
  fragility    RQ4  survival by firing-rate quintile
  causal       RQ5  survival against each dense feature's causal effect on the loss
  convergence       seed agreement over training, distance from init, training curves

    from prunesae_jax.analysis import measures
    out = {name: measures.get(name)(dense, cond) for name in measures.ORDER}

A new measure is a new module with a function decorated by `@register('<name>')`, imported below
and added to ORDER.
"""

from prunesae_jax.analysis.measures import causal, convergence, fragility, stability, survival, transfer
from prunesae_jax.analysis.measures.base import (
    MEASURES,
    Condition,
    Dense,
    Measure,
    Settings,
    interval_dict,
    register,
)
from prunesae_jax.errors import InputError

__all__ = [
    'ORDER',
    'MEASURES',
    'Condition',
    'Dense',
    'Measure',
    'Settings',
    'get',
    'interval_dict',
    'register',
    'causal',
    'convergence',
    'fragility',
    'stability',
    'survival',
    'transfer',
]

# The fixed order the study runs the registered measures in, for every condition (results.json
# stores each under its name with sorted keys, so the order decides only what is computed first:
# survival's matching, which fragility and causal read, before them).
ORDER = ('stability', 'survival', 'fragility', 'causal', 'transfer', 'convergence')


def get(name: str) -> Measure:
    """The measure registered as `name`; InputError naming the registered ones otherwise."""
    if name not in MEASURES:
        raise InputError(f'measure {name!r} is not registered; accepted: {" | ".join(sorted(MEASURES))}')
    return MEASURES[name]
