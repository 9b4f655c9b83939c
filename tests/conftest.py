"""Shared test fixtures: a random tiny transformers model matching a DecoderConfig, and free TCP
ports for the coordinators of local jax.distributed runs."""

import socket

import pytest


def _random_hf_model(cfg, seed: int = 0, dtype: str = 'float32'):
    """A transformers *ForCausalLM (eager attention) with the architecture of cfg and random,
    non-trivial weights: norms away from identity so a missed (1 + w) or post-norm shows."""
    import torch
    import transformers

    hf_config = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation='eager')
    D = cfg.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('norm.weight') or 'layernorm' in name:
                base = 0.0 if cfg.norm_plus_one else 1.0
                p.copy_(base + 0.2 * torch.randn_like(p))
            elif 'embed_tokens' in name:
                p.copy_(torch.randn_like(p) * (1.0 / D**0.5 if cfg.scale_embeddings else 1.0))
            else:
                p.copy_(torch.randn_like(p) * (1.5 / p.shape[1] ** 0.5))
    model = model.eval().to(getattr(torch, dtype))
    return model


@pytest.fixture(scope='session')
def make_hf_model():
    return _random_hf_model


def _free_port() -> int:
    """A localhost TCP port nobody listens on now (a jax.distributed coordinator's)."""
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='session')
def free_port():
    """free_port() -> a localhost TCP port nobody listens on now."""
    return _free_port
