"""The paper's grid on Llama 3.2 1B (meta-llama/Llama-3.2-1B), SAEs at layer 8.

Magnitude (global threshold) and Wanda (per output row) at dense + 10..60 %;
3 seeds of 8x TopK SAEs (16384 latents) on ~1.5M FineWeb-Edu tokens of resid_post
per condition; tau = 0.7; perplexity on WikiText-2 raw test (window 1024,
stride 512, bf16). The paper does not name the Llama layer; we take the middle
one, 8 of 16. There is no Gemma Scope for Llama, so the transfer question uses
the dense condition's own SAE (seed 0) as the fixed dictionary, as the paper does.

The model repo is gated: accept the licence and `huggingface-cli login` (or set
HF_TOKEN), or pass a local copy: --config.model=/data/Llama-3.2-1B.
The FineWeb-Edu / WikiText-2 data need `pip install -e '.[datasets]'`.

Launch (from the repository root):

  GPU (one H100/A100, ~3-5 hours):
        pip install -e '.[cuda,datasets]'
        python launch/run_study.py --config=configs/paper_llama32_1b.py --workdir=/scratch/llama_1b
  TPU host (single host, e.g. v5e-8 or v4-8; SAE training data-parallel over the chips):
        pip install -e '.[tpu,datasets]'
        python launch/run_study.py --config=configs/paper_llama32_1b.py --workdir=/scratch/llama_1b \
            --config.mesh.seed=1 --config.mesh.data=-1
  CPU (days; only for checking the setup, with smaller budgets):
        python launch/run_study.py --config=configs/paper_llama32_1b.py --workdir=/tmp/llama_1b \
            --config.dtype=float32 --config.sae.n_tokens=100000 --config.ppl.max_tokens=16384

  Several hosts (a SLURM job over GPU hosts, a TPU v5e / v6e pod slice): the same command on
        every host with --config.distributed.enabled=True and a workdir every host mounts; the
        copyable recipes (sbatch script, gcloud commands, mesh flags) and what each process does
        are in BUILD.md, "Multi-device and multi-host".

The workdir caches every finished stage: re-run the same command to resume.
"""

from prunesae_jax.study.config import paper_base_config


def get_config():
    """The Llama 3.2 1B paper config (see the module docstring)."""
    config = paper_base_config()
    config.name = 'paper: Llama 3.2 1B, layer 8'
    config.model = 'meta-llama/Llama-3.2-1B'
    config.layer = 8  # transfer: the dense condition's own SAE (base_config's transfer.source)
    return config
