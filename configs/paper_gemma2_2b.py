"""The paper's grid on Gemma 2 2B (google/gemma-2-2b), SAEs at layer 12.

Magnitude (global threshold) and Wanda (per output row) at dense + 10..60 %;
3 seeds of 8x TopK SAEs (18432 latents) on ~1.5M FineWeb-Edu tokens of resid_post
per condition; tau = 0.7; perplexity on WikiText-2 raw test (window 1024,
stride 512, bf16). The paper reports Gemma 3 at layer 13 and does not name the
Gemma 2 layer; we take layer 12 (of 26), the middle layer where Gemma Scope's
canonical residual dictionaries live. Transfer uses the Gemma Scope (v1)
JumpReLU dictionary google/gemma-scope-2b-pt-res,
layer_12/width_16k/average_l0_82/params.npz.

The model repo is gated: accept the licence and `huggingface-cli login` (or set
HF_TOKEN), or pass local copies: --config.model=/data/gemma-2-2b
--config.transfer.repo='' --config.transfer.path=/data/gemma-scope/params.npz.
The FineWeb-Edu / WikiText-2 data need `pip install -e '.[datasets]'`.

Launch (from the repository root):

  GPU (one H100/A100, ~6-8 hours):
        pip install -e '.[cuda,datasets]'
        python launch/run_study.py --config=configs/paper_gemma2_2b.py --workdir=/scratch/g2_2b
  TPU host (single host, e.g. v5e-8 or v4-8; SAE training data-parallel over the chips):
        pip install -e '.[tpu,datasets]'
        python launch/run_study.py --config=configs/paper_gemma2_2b.py --workdir=/scratch/g2_2b \
            --config.mesh.seed=1 --config.mesh.data=-1
  CPU (days; only for checking the setup, with smaller budgets):
        python launch/run_study.py --config=configs/paper_gemma2_2b.py --workdir=/tmp/g2_2b \
            --config.dtype=float32 --config.sae.n_tokens=100000 --config.ppl.max_tokens=16384

  Several hosts (a SLURM job over GPU hosts, a TPU v5e / v6e pod slice): the same command on
        every host with --config.distributed.enabled=True and a workdir every host mounts; the
        copyable recipes (sbatch script, gcloud commands, mesh flags) and what each process does
        are in BUILD.md, "Multi-device and multi-host".

The workdir caches every finished stage: re-run the same command to resume.
"""

from prunesae_jax.study.config import paper_base_config


def get_config():
    """The Gemma 2 2B paper config (see the module docstring)."""
    config = paper_base_config()
    config.name = 'paper: Gemma 2 2B, layer 12'
    config.model = 'google/gemma-2-2b'
    config.layer = 12
    config.transfer.source = 'pretrained'
    config.transfer.repo = 'google/gemma-scope-2b-pt-res'
    config.transfer.path = 'layer_12/width_16k/average_l0_82/params.npz'
    return config
