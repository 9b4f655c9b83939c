"""The smoke study: a tiny random Gemma-3-style model, for the tests (about a minute on 2 cores).

Exercises every stage of the pipeline (prune, perplexity, capture, vmapped SAE
training, RQ1-RQ5, report) on `prunesae_jax.testing.tiny_config('gemma3_text')`
and the built-in corpus. The numbers mean nothing; only their ranges are checked.

Launch (from the repository root):

  CPU:  python launch/run_study.py --config=configs/smoke.py --workdir=/tmp/prunesae_smoke
  GPU:  pip install -e '.[cuda]' and the same command
  TPU host: pip install -e '.[tpu]' and the same command (add --config.mesh.data=-1)

Other tiny families: --config.model=tiny:llama or --config.model=tiny:gemma2.
"""

from prunesae_jax.study.config import base_config


def get_config():
    """The smoke run's config (see the module docstring)."""
    config = base_config()
    config.name = 'smoke: tiny random model'
    config.model = 'tiny:gemma3_text'
    config.layer = 1

    config.calibration.n_samples = 4
    config.calibration.seq_len = 32
    config.ppl.window = 64
    config.ppl.stride = 32
    config.ppl.max_tokens = 4096  # the minimum (study.config.MIN_TOKENS)
    config.ppl.batch_size = 4

    config.pruning.sparsities = (0.0, 0.5)  # three conditions: dense, magnitude 50%, Wanda 50%

    config.sae.k = 8
    config.sae.n_tokens = 2048
    config.sae.seq_len = 32
    config.sae.batch_size = 256
    config.sae.n_seeds = 2
    config.sae.epochs = 4  # 32 steps of 256 tokens
    config.sae.capture_batch = 8

    config.analysis.n_bootstrap = 50
    config.analysis.transfer_tokens = 2048  # the minima (study.config.MIN_TOKENS)
    config.analysis.causal_features = 8
    config.analysis.causal_tokens = 1024
    config.analysis.min_firings = 2

    config.progress = False
    return config
