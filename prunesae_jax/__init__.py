"""prunesae_jax: how weight pruning reshapes the features of language models, in JAX.

The stages follow the data, one way only:

    checkpoint -> models -> pruning -> sae (activations, dictionaries) -> analysis -> study (report)

    import prunesae_jax as psj
    cfg, params = psj.load_model('smollm2-135m')               # zoo name, HF folder, .gguf or hub id
    result = psj.prune(cfg, params, 'wanda', 0.5, calib_tokens=tokens)
    psj.models.resid_post(cfg, result.params, tokens, layers=(15,))
    psj.analysis.mnn_match(dec_a, dec_b, tau=0.7)
    psj.run_study(config, workdir)                             # the whole grid, as launch/run_study.py

Submodules import lazily, so `import prunesae_jax` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = '0.1.0'

_SUBMODULES = ('models', 'data', 'pruning', 'sae', 'analysis', 'study', 'sharding', 'testing')
# Top-level names -> (module, attribute).
_EXPORTS = {
    'load_model': ('prunesae_jax.models.convert', 'load'),
    'prune': ('prunesae_jax.pruning', 'prune'),
    'train_saes': ('prunesae_jax.sae.train', 'train'),
    'measures': ('prunesae_jax.analysis', 'measures'),
    'run_study': ('prunesae_jax.study.pipeline', 'run'),
}

__all__ = list(_SUBMODULES) + list(_EXPORTS)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f'prunesae_jax.{name}')
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f'module prunesae_jax has no attribute {name!r}')
