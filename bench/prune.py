"""Pruning speed on a real model: Wanda, magnitude and SparseGPT in JAX vs a PyTorch Wanda.

    python bench/prune.py                                   # Gemma 3 270M, 128 x 512 calibration
    python bench/prune.py --n_samples=32 --skip_sparsegpt
    python bench/prune.py --quick                           # tiny random model, seconds, writes nothing

The PyTorch baseline is a straightforward implementation of the Wanda reference's algorithm on
the same transformers model and calibration tokens: forward hooks on every nn.Linear of a
block accumulate the input feature norms, metric |W| * sqrt(norm), a stable per-output-row sort
zeroes int(d_in * s) weights, then the block is re-run to feed the next one (block-sequential).
Results go to the "Pruning" section of BENCHMARKS.md (other sections are left untouched).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

SECTION = 'Pruning'

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """This script's flags. Defined only when the file runs as a script: tests import it as a module
    (under more than one name), and absl refuses a flag that is defined twice."""
    flags.DEFINE_string('model', 'gemma-3-270m', 'Zoo model to prune.')
    flags.DEFINE_integer('n_samples', 128, 'Calibration sequences.')
    flags.DEFINE_integer('seq_len', 512, 'Tokens per calibration sequence.')
    flags.DEFINE_integer('batch_size', 8, 'Calibration micro-batch.')
    flags.DEFINE_float('sparsity', 0.5, 'Target sparsity.')
    flags.DEFINE_bool('skip_torch', False, 'Skip the PyTorch Wanda reference.')
    flags.DEFINE_bool('skip_sparsegpt', False, 'Skip JAX SparseGPT.')
    flags.DEFINE_bool('skip_magnitude', False, 'Skip JAX magnitude pruning.')
    flags.DEFINE_bool('warm_run', True, 'Time a second JAX Wanda run (the time without jit compilation).')
    flags.DEFINE_bool('quick', False, 'Tiny random Gemma 3 model and random tokens (seconds; a smoke test, no zoo).')
    flags.DEFINE_string(
        'out', None, 'Markdown file (default: the repo BENCHMARKS.md; with --quick: none unless given).'
    )
    flags.DEFINE_string('json', None, 'Also write the numbers to this JSON file.')


# ----------------------------------------------------------------------------- PyTorch reference


class _Stop(Exception):
    pass


def _layers(model):
    return model.model.layers


def torch_wanda(model, tokens, sparsity: float, batch_size: int = 8) -> dict:
    """Wanda (per output row, sequential) on a transformers *ForCausalLM, pruning it in place.

    tokens: [n, T] int array. Returns {(layer, name): keep-mask bool [out, in] (torch layout)}.
    """
    import torch

    layers = _layers(model)
    batches = [
        torch.as_tensor(np.asarray(tokens[a : a + batch_size]), dtype=torch.long)
        for a in range(0, len(tokens), batch_size)
    ]
    # The reference's "Catcher": the inputs of block 0 and the keyword arguments of every block.
    layer_kwargs, inps = {}, []

    def grab_kwargs(i):
        def hook(mod, args, kwargs):
            layer_kwargs[i] = {k: v for k, v in kwargs.items() if k != 'hidden_states'}

        return hook

    handles = [l.register_forward_pre_hook(grab_kwargs(i), with_kwargs=True) for i, l in enumerate(layers)]
    with torch.no_grad():  # one sequence through the model for the per-layer masks / rotary tables
        model(batches[0][:1], use_cache=False)  # (they broadcast over the batch)
    for h in handles:
        h.remove()

    def catch(mod, args, kwargs):
        inps.append(args[0] if args else kwargs['hidden_states'])
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            try:
                model(b, use_cache=False)
            except _Stop:
                pass
    handle.remove()
    if len(batches[-1]) != len(batches[0]):
        raise ValueError(f'n_samples {len(tokens)} must be a multiple of batch_size {batch_size}')

    def run(layer, kw, x):
        out = layer(x, **kw)
        return out[0] if isinstance(out, tuple) else out

    keep = {}
    with torch.no_grad():
        for i, layer in enumerate(layers):
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            scaler = {n: torch.zeros(m.in_features, dtype=torch.float32) for n, m in linears.items()}

            def stat(name):
                def hook(mod, inp, out):
                    x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                    scaler[name] += (x * x).sum(0)

                return hook

            hs = [m.register_forward_hook(stat(n)) for n, m in linears.items()]
            for x in inps:
                run(layer, layer_kwargs[i], x)
            for h in hs:
                h.remove()
            for n, m in linears.items():
                W = m.weight.data  # [out, in]
                metric = W.abs().float() * torch.sqrt(scaler[n]).reshape(1, -1)
                idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(W.shape[1] * sparsity)]
                prune = torch.zeros_like(W, dtype=torch.bool).scatter_(1, idx, True)
                W[prune] = 0
                keep[(i, n.split('.')[-1])] = (~prune).numpy()
            inps = [run(layer, layer_kwargs[i], x) for x in inps]
    return keep


# ----------------------------------------------------------------------------- main


def mask_agreement(jax_masks, torch_keep: dict) -> tuple[float, list[float]]:
    """Fraction of equal keep-mask entries between our masks ([in, out]) and torch_wanda's ([out, in]).

    Returns (over every matrix, per layer). Per layer shows where disagreement comes from: the
    two forwards differ by float rounding, and sequential calibration carries that down the stack.
    """
    equal, total = {}, {}
    for (i, name), keep in torch_keep.items():
        ours = np.asarray(jax_masks['layers'][i][name]).T
        if ours.shape != keep.shape:
            from prunesae_jax.errors import InputError

            raise InputError(f'layer {i} {name}: JAX mask {ours.shape} vs PyTorch {keep.shape}; expected equal shapes')
        equal[i] = equal.get(i, 0) + int((ours == keep).sum())
        total[i] = total.get(i, 0) + keep.size
    layers = sorted(total)
    return sum(equal.values()) / sum(total.values()), [equal[i] / total[i] for i in layers]


def _calibration(tokenizer, n, seq_len, bos):
    from prunesae_jax.data.corpus import take_tokens

    try:
        return take_tokens('builtin', tokenizer, n, seq_len, split='calibration', bos_id=bos), 'calibration'
    except ValueError:  # the built-in calibration split is small; fall back to the train split
        return take_tokens('builtin', tokenizer, n, seq_len, split='train', bos_id=bos), 'train'


def _tiny_model():
    """A random tiny Gemma 3 model and random calibration tokens (no zoo, no tokenizer): --quick."""
    from prunesae_jax.models.decoder import init_params
    from prunesae_jax.testing import tiny_config

    cfg = tiny_config('gemma3_text')
    return cfg, init_params(cfg, 0)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments {argv[1:]}')
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax

    from prunesae_jax.models.config import PRUNABLE
    from prunesae_jax.models.convert import export_hf_folder
    from prunesae_jax.pruning import prune

    from _common import BENCHMARKS, machine, write_section

    if FLAGS.quick:
        cfg, params = _tiny_model()
        n, T = min(FLAGS.n_samples, 4), min(FLAGS.seq_len, 32)
        tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (n, T)).astype(np.int32)
        tokens[:, 0] = cfg.bos_token_id
        model_name, split = 'tiny:gemma3_text (random weights)', 'random'
    else:
        from prunesae_jax.models.zoo import load_zoo

        cfg, params, tok = load_zoo(FLAGS.model)
        tokens, split = _calibration(tok, FLAGS.n_samples, FLAGS.seq_len, cfg.bos_token_id)
        model_name = FLAGS.model
    n_prunable = sum(int(np.prod(lp[n].shape)) for lp in params['layers'] for n in PRUNABLE)
    print(
        f'{model_name}: {cfg.num_layers} layers, {n_prunable / 1e6:.1f}M prunable weights, '
        f'calibration {tokens.shape} from the {split} split; {os.cpu_count()} CPUs',
        flush=True,
    )
    rows, results = [], {}

    def timed(label, fn):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(jax.tree.leaves(out.params))
        dt = time.perf_counter() - t
        print(f'{label}: {dt:.1f}s ({out.report["overall"]:.4f} sparsity)', flush=True)
        rows.append((label, dt))
        return out, dt

    kw = dict(calib_tokens=tokens, batch_size=FLAGS.batch_size, progress=False)
    s = FLAGS.sparsity
    wanda, t_wanda = timed(
        'JAX Wanda per_row, sequential (incl. jit compile)', lambda: prune(cfg, params, 'wanda', s, **kw)
    )
    results['jax_wanda_s'] = t_wanda
    t_warm = None
    if FLAGS.warm_run:  # same shapes: every jitted function is already compiled
        _, t_warm = timed(
            'JAX Wanda per_row, sequential (warm, compiled)', lambda: prune(cfg, params, 'wanda', s, **kw)
        )
        results['jax_wanda_warm_s'] = t_warm
    if not FLAGS.skip_magnitude:
        results['jax_magnitude_per_matrix_s'] = timed(
            'JAX magnitude per_matrix', lambda: prune(cfg, params, 'magnitude', s, group='per_matrix', progress=False)
        )[1]
        results['jax_magnitude_global_s'] = timed(
            'JAX magnitude global', lambda: prune(cfg, params, 'magnitude', s, group='global', progress=False)
        )[1]
    if not FLAGS.skip_sparsegpt:
        results['jax_sparsegpt_s'] = timed(
            'JAX SparseGPT, sequential (incl. jit compile)', lambda: prune(cfg, params, 'sparsegpt', s, **kw)
        )[1]

    t_torch = agree = None
    if not FLAGS.skip_torch:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        with tempfile.TemporaryDirectory() as d:
            export_hf_folder(cfg, params, d)
            model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        t = time.perf_counter()
        keep = torch_wanda(model, tokens, s, batch_size=FLAGS.batch_size)
        t_torch = time.perf_counter() - t
        agree, agree_layers = mask_agreement(wanda.masks, keep)
        print(
            f'PyTorch Wanda per_row, sequential: {t_torch:.1f}s ({torch.get_num_threads()} threads); '
            f'mask agreement with JAX Wanda {agree:.6f} (per layer: '
            f'{" ".join(f"{a:.4f}" for a in agree_layers)})',
            flush=True,
        )
        rows.append(
            (f'PyTorch Wanda per_row, sequential (reference algorithm, {torch.get_num_threads()} threads)', t_torch)
        )
        results.update(
            torch_wanda_s=t_torch,
            torch_threads=torch.get_num_threads(),
            mask_agreement=agree,
            mask_agreement_per_layer=agree_layers,
            speedup=t_torch / t_wanda,
            speedup_warm=t_torch / t_warm if t_warm else None,
        )

    flag = ' --quick' if FLAGS.quick else f' --model={FLAGS.model}'
    body = [
        f'`bench/prune.py{flag} --n_samples={tokens.shape[0]} --seq_len={tokens.shape[1]}` '
        f'({model_name}, {cfg.num_layers} layers, {n_prunable / 1e6:.1f}M prunable weights, sparsity {s}, '
        f'calibration {tokens.shape[0]} x {tokens.shape[1]} tokens of the {split} split, the same tokens for JAX and '
        f'PyTorch, float32, micro-batch {FLAGS.batch_size}). Machine: {machine()}. Both Wanda runs are '
        'block-sequential (each block calibrates on the pruned outputs of the blocks before it) with a per-output-row '
        'selection of the lowest |W| * ||X||. JAX times include jit compilation unless marked warm (a second run in '
        'the same process); PyTorch runs with torch.set_num_threads(os.cpu_count()) and XLA uses every core. The '
        'machine may be shared with other jobs, so times are upper bounds.',
        '',
        '| run | seconds |',
        '|---|---|',
    ] + [f'| {label} | {dt:.1f} |' for label, dt in rows]
    if t_torch is not None:
        warm = f'; warm (compiled) JAX: **{t_torch / t_warm:.2f}x**' if t_warm else ''
        body += [
            '',
            f'Wanda speed-up JAX vs PyTorch, JAX compile included: **{t_torch / t_wanda:.2f}x**{warm} '
            f'(target >= 1.5x on CPU). JAX and PyTorch keep masks agree on {agree:.4%} of the entries '
            f'(layer 0: {agree_layers[0]:.4%}, last layer: {agree_layers[-1]:.4%}).',
        ]
        print(
            f'ratio PyTorch / JAX Wanda: {t_torch / t_wanda:.2f}x'
            + (f' (warm {t_torch / t_warm:.2f}x)' if t_warm else ''),
            flush=True,
        )
    if FLAGS.json:
        with open(FLAGS.json, 'w') as f:
            json.dump(results, f, indent=1)
    out = FLAGS.out or (None if FLAGS.quick else BENCHMARKS)
    if out:
        write_section(SECTION, '\n'.join(body), out)
        print(f'wrote section {SECTION!r} of {out}')
    else:
        print('\n'.join(body))


if __name__ == '__main__':
    _define_flags()
    app.run(main)
