"""Sparse autoencoders: many seeds trained in one vmapped, jitted step; activation stores; SAE files.

Layout: config.py (SAEConfig, TrainConfig), arch/ (one module per architecture, registered by name),
common.py (the maths they share: decode, FVU, AuxK picks), kernels.py (the hand-written gradients and
the fused Adam), core.py (one SAE: init, encode, evaluate, train_loss), train.py (S seeds at once),
store.py (activation capture and stores), io.py (SAELens / Gemma Scope / sparsify files). The public
API is listed in __all__ below; docs/method.md defines the architectures and losses.
"""

from prunesae_jax.sae.arch import ARCHITECTURES
from prunesae_jax.sae.arch.topk import encode_topk
from prunesae_jax.sae.common import decode, fvu
from prunesae_jax.sae.config import SAEConfig, TrainConfig
from prunesae_jax.sae.core import (
    encode,
    evaluate,
    fold_scale,
    geometric_median,
    init,
    lr_default,
    reconstruct,
    train_loss,
)
from prunesae_jax.sae.io import export_saelens, load_gemmascope, load_sae, load_saelens, load_sparsify
from prunesae_jax.sae.kernels import sparse_decode
from prunesae_jax.sae.store import ActivationStore, ArrayStore, capture_activations
from prunesae_jax.sae.train import (
    TrainResult,
    capture_and_train,
    evaluate_seeds,
    initial_decoder,
    make_train_step,
    stack_seeds,
    train,
    unstack_seed,
)

__all__ = [
    'ARCHITECTURES',
    'SAEConfig',
    'TrainConfig',
    'decode',
    'encode',
    'encode_topk',
    'evaluate',
    'fold_scale',
    'fvu',
    'geometric_median',
    'init',
    'lr_default',
    'reconstruct',
    'sparse_decode',
    'train_loss',
    'export_saelens',
    'load_gemmascope',
    'load_sae',
    'load_saelens',
    'load_sparsify',
    'ActivationStore',
    'ArrayStore',
    'capture_activations',
    'TrainResult',
    'capture_and_train',
    'evaluate_seeds',
    'initial_decoder',
    'make_train_step',
    'stack_seeds',
    'train',
    'unstack_seed',
]
