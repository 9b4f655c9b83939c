"""Residual-stream capture throughput: our Flax forward against transformers' PyTorch, side by side.

Both load the same weights (the zoo's cached HF folder, fp32), run the same token batches and
stop after the capture layer: ours with `resid_post(..., layers=(mid,))`, transformers with its
decoder stack cut after that layer and no head. Tokens/s is the best of `--repeats` timed calls
after one warm-up call (which also compiles ours).

    python bench/extract.py                                  # Gemma 3 270M, 8 x 256 (issue 2)
    python bench/extract.py --models=gemma-3-270m,smollm2-135m --shapes=8x256,32x512
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
from absl import app, flags

import _common

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['gemma-3-270m'], 'Zoo models to measure.')
flags.DEFINE_list('shapes', ['8x256'], 'Batch shapes BxT.')
flags.DEFINE_integer('repeats', 3, 'Timed calls per side; the best is kept.')
flags.DEFINE_bool('write', True, 'Write the "Activation capture" section of BENCHMARKS.md.')


def measure(name: str, shapes: list[tuple[int, int]], repeats: int) -> list[dict]:
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from prunesae_jax.models import load_hf_folder, resid_post
    from prunesae_jax.models.zoo import hf_folder

    folder = hf_folder(name)
    cfg, params = load_hf_folder(folder, dtype='float32')
    layer = cfg.num_layers // 2
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation='sdpa').eval()
    body = hf.model
    body.layers = body.layers[:layer + 1]  # stop early, as ours does
    rng = np.random.default_rng(0)
    rows = []
    for b, t in shapes:
        tokens = rng.integers(1, cfg.vocab_size, size=(b, t), dtype=np.int32)
        tokens[:, 0] = cfg.bos_token_id if cfg.bos_token_id is not None else 1

        def ours():
            jax.block_until_ready(resid_post(cfg, params, tokens, layers=(layer,)))

        tt = torch.from_numpy(tokens.astype(np.int64))

        def theirs():
            with torch.inference_mode():
                body(input_ids=tt, use_cache=False)

        ours(), theirs()  # warm-up: compiles ours, warms torch's allocator
        t_ours = _common.best_of(ours, repeats)
        t_theirs = _common.best_of(theirs, repeats)
        rows.append(dict(model=name, shape=f'{b}x{t}', layer=layer, ours=b * t / t_ours,
                                          theirs=b * t / t_theirs, ratio=t_theirs / t_ours))
        print(f'{name} {b}x{t} layer {layer}: ours {b * t / t_ours:,.0f} tok/s, '
                    f'transformers {b * t / t_theirs:,.0f} tok/s, ratio {t_theirs / t_ours:.2f}x', flush=True)
    return rows


def main(argv):
    del argv
    import torch
    shapes = [tuple(int(v) for v in s.lower().split('x')) for s in FLAGS.shapes]
    rows = []
    for name in FLAGS.models:
        rows += measure(name, shapes, FLAGS.repeats)
    if not FLAGS.write:
        return
    body = [
            f'Machine: {_common.machine()}; torch {torch.__version__} with {torch.get_num_threads()} threads, SDPA attention.',
            '',
            'Residual-stream capture at the middle layer, fp32, both sides stopping after that layer '
            '(transformers: decoder stack cut, no head). Target: at least 1.2x transformers on CPU.',
            f'Reproduce: `python bench/extract.py --models={",".join(FLAGS.models)} --shapes={",".join(FLAGS.shapes)}`.',
            '',
            '| model | batch | layer | prunesae_jax tok/s | transformers tok/s | ratio |',
            '|---|---|---|---|---|---|',
    ]
    body += [f'| {r["model"]} | {r["shape"]} | {r["layer"]} | {r["ours"]:,.0f} | {r["theirs"]:,.0f} | '
                      f'{r["ratio"]:.2f}x |' for r in rows]
    _common.write_section('Activation capture', '\n'.join(body))


if __name__ == '__main__':
    app.run(main)
