"""Sparse autoencoders: many seeds trained in one vmapped, jitted step; activation stores; SAE files.

The public API is listed in __all__ below; docs/method.md defines the architectures and losses.
"""

from prunesae_jax.sae.core import (ARCHITECTURES, SAEConfig, decode, encode, encode_topk, evaluate, fold_scale,
                                   fvu, geometric_median, init, lr_default, reconstruct, sparse_decode,
                                   train_loss)
from prunesae_jax.sae.io import export_saelens, load_gemmascope, load_sae, load_saelens, load_sparsify
from prunesae_jax.sae.store import ActivationStore, ArrayStore, capture_activations
from prunesae_jax.sae.train import (TrainConfig, TrainResult, capture_and_train, evaluate_seeds,
                                    make_train_step, stack_seeds, train, unstack_seed)

__all__ = [
    "ARCHITECTURES", "SAEConfig", "decode", "encode", "encode_topk", "evaluate", "fold_scale", "fvu",
    "geometric_median", "init", "lr_default", "reconstruct", "sparse_decode", "train_loss",
    "export_saelens", "load_gemmascope", "load_sae", "load_saelens", "load_sparsify",
    "ActivationStore", "ArrayStore", "capture_activations",
    "TrainConfig", "TrainResult", "capture_and_train", "evaluate_seeds", "make_train_step", "stack_seeds",
    "train", "unstack_seed",
]
