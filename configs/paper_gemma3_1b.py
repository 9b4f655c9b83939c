"""The paper's grid on Gemma 3 1B (google/gemma-3-1b-pt), SAEs at layer 13.

Magnitude (global threshold) and Wanda (per output row) at dense + 10..60 %;
3 seeds of 8x TopK SAEs (9216 latents) on ~1.5M FineWeb-Edu tokens of layer-13
resid_post per condition; tau = 0.7; perplexity on WikiText-2 raw test
(window 1024, stride 512, bf16). Transfer uses the Gemma Scope 2 JumpReLU
dictionary for layer 13 (repo google/gemma-scope-2-1b-pt, folder
resid_post/layer_13_width_16k_l0_medium, params.safetensors).

The model and Gemma Scope repos are gated: accept the licence on the hub and
`huggingface-cli login` (or set HF_TOKEN), or download them and pass local
folders: --config.model=/data/gemma-3-1b-pt --config.transfer.repo='' \
--config.transfer.path=/data/gemma-scope-2-1b-pt/resid_post/layer_13_width_16k_l0_medium.
The FineWeb-Edu / WikiText-2 data need `pip install -e '.[datasets]'` (or local
folders in --config.data.*.source).

Launch (from the repository root):

  GPU (one H100/A100, ~3-5 hours):
        pip install -e '.[cuda,datasets]'
        python launch/run_study.py --config=configs/paper_gemma3_1b.py --workdir=/scratch/g3_1b
  TPU host (single host, e.g. v5e-8 or v4-8; SAE training data-parallel over the chips):
        pip install -e '.[tpu,datasets]'
        python launch/run_study.py --config=configs/paper_gemma3_1b.py --workdir=/scratch/g3_1b \
            --config.mesh.seed=1 --config.mesh.data=-1
  CPU (days; only for checking the setup, with smaller budgets):
        python launch/run_study.py --config=configs/paper_gemma3_1b.py --workdir=/tmp/g3_1b \
            --config.dtype=float32 --config.sae.n_tokens=100000 --config.ppl.max_tokens=16384

  Several hosts (a SLURM job over GPU hosts, a TPU v5e / v6e pod slice): the same command on
        every host with --config.distributed.enabled=True and a workdir every host mounts; the
        copyable recipes (sbatch script, gcloud commands, mesh flags) and what each process does
        are in BUILD.md, "Multi-device and multi-host".

The workdir caches every finished stage: re-run the same command to resume.
"""

from prunesae_jax.study.config import paper_base_config


def get_config():
    """The Gemma 3 1B paper config (see the module docstring)."""
    config = paper_base_config()
    config.name = 'paper: Gemma 3 1B, layer 13'
    config.model = 'google/gemma-3-1b-pt'
    config.layer = 13
    config.transfer.source = 'pretrained'
    config.transfer.repo = 'google/gemma-scope-2-1b-pt'
    config.transfer.path = 'resid_post/layer_13_width_16k_l0_medium'
    return config
