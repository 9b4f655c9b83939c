"""Pruning speed on a real model: Wanda, magnitude and SparseGPT in JAX vs a PyTorch Wanda.

    /work/venv/bin/python bench/prune.py                      # Gemma 3 270M, 128 x 512 calibration
    /work/venv/bin/python bench/prune.py --n-samples 32 --skip-sparsegpt

The PyTorch baseline is a straightforward implementation of the Wanda reference's algorithm on
the same transformers model and calibration tokens: forward hooks on every nn.Linear of a
block accumulate the input feature norms, metric |W| * sqrt(norm), a stable per-output-row sort
zeroes int(d_in * s) weights, then the block is re-run to feed the next one (block-sequential).
Results go to the "Pruning" section of BENCHMARKS.md (other sections are left untouched).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

SECTION = 'Pruning'


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
    batches = [torch.as_tensor(np.asarray(tokens[a:a + batch_size]), dtype=torch.long)
               for a in range(0, len(tokens), batch_size)]
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
                idx = torch.sort(metric, dim=-1, stable=True)[1][:, :int(W.shape[1] * sparsity)]
                prune = torch.zeros_like(W, dtype=torch.bool).scatter_(1, idx, True)
                W[prune] = 0
                keep[(i, n.split('.')[-1])] = (~prune).numpy()
            inps = [run(layer, layer_kwargs[i], x) for x in inps]
    return keep


# ----------------------------------------------------------------------------- main


def _calibration(tokenizer, n, seq_len, bos):
    from prunesae_jax.data.corpus import take_tokens

    try:
        return take_tokens('builtin', tokenizer, n, seq_len, split='calibration', bos_id=bos), 'calibration'
    except ValueError:  # the built-in calibration split is small; fall back to the train split
        return take_tokens('builtin', tokenizer, n, seq_len, split='train', bos_id=bos), 'train'


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='gemma-3-270m')
    ap.add_argument('--n-samples', type=int, default=128)
    ap.add_argument('--seq-len', type=int, default=512)
    ap.add_argument('--batch-size', type=int, default=8)
    ap.add_argument('--sparsity', type=float, default=0.5)
    ap.add_argument('--skip-torch', action='store_true')
    ap.add_argument('--skip-sparsegpt', action='store_true')
    ap.add_argument('--out', default=None, help='markdown file (default: the repo BENCHMARKS.md)')
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import BENCHMARKS, machine, write_section

    import jax

    from prunesae_jax.models.convert import export_hf_folder
    from prunesae_jax.models.zoo import load_zoo
    from prunesae_jax.pruning import prune

    cfg, params, tok = load_zoo(args.model)
    tokens, split = _calibration(tok, args.n_samples, args.seq_len, cfg.bos_token_id)
    n_prunable = sum(int(np.prod(lp[n].shape)) for lp in params['layers'] for n in
                     ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'))
    print(f'{args.model}: {cfg.num_layers} layers, {n_prunable / 1e6:.1f}M prunable weights, '
          f'calibration {tokens.shape} from the builtin {split} split', flush=True)
    rows = []

    def timed(label, fn):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(jax.tree.leaves(out.params))
        dt = time.perf_counter() - t
        print(f'{label}: {dt:.1f}s ({out.report["overall"]:.4f} sparsity)', flush=True)
        rows.append((label, dt))
        return out, dt

    kw = dict(calib_tokens=tokens, batch_size=args.batch_size, progress=False)
    s = args.sparsity
    _, t_wanda = timed('JAX Wanda per_row, sequential', lambda: prune(cfg, params, 'wanda', s, **kw))
    timed('JAX magnitude per_matrix', lambda: prune(cfg, params, 'magnitude', s, group='per_matrix', progress=False))
    timed('JAX magnitude global', lambda: prune(cfg, params, 'magnitude', s, group='global', progress=False))
    if not args.skip_sparsegpt:
        timed('JAX SparseGPT, sequential', lambda: prune(cfg, params, 'sparsegpt', s, **kw))

    t_torch = None
    if not args.skip_torch:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        with tempfile.TemporaryDirectory() as d:
            export_hf_folder(cfg, params, d)
            model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        t = time.perf_counter()
        torch_wanda(model, tokens, s, batch_size=args.batch_size)
        t_torch = time.perf_counter() - t
        print(f'PyTorch Wanda per_row, sequential: {t_torch:.1f}s', flush=True)
        rows.append(('PyTorch Wanda per_row, sequential (reference algorithm)', t_torch))

    body = [
        f'`bench/prune.py --model {args.model} --n-samples {args.n_samples} --seq-len {args.seq_len}` '
        f'({cfg.num_layers} layers, {n_prunable / 1e6:.1f}M prunable weights, sparsity {s}, '
        f'calibration {args.n_samples} x {args.seq_len} tokens of the builtin corpus, float32, '
        f'micro-batch {args.batch_size}). Machine: {machine()}. Times include jit compilation; the '
        f'machine may be shared with other jobs, so both columns are upper bounds.',
        '',
        '| run | seconds |',
        '|---|---|',
    ] + [f'| {label} | {dt:.1f} |' for label, dt in rows]
    if t_torch is not None:
        body += ['', f'Wanda speed-up JAX vs PyTorch: **{t_torch / t_wanda:.2f}x** (target >= 1.5x on CPU).']
        print(f'ratio PyTorch / JAX Wanda: {t_torch / t_wanda:.2f}x', flush=True)
    out = args.out or BENCHMARKS
    write_section(SECTION, '\n'.join(body), out)
    print(f'wrote section {SECTION!r} of {out}')


if __name__ == '__main__':
    sys.exit(main())
