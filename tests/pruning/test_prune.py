"""prune() on tiny models: calibration capture, sequential Wanda vs a PyTorch reference, N:M,
exact counts, HF export parity, errors."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunesae_jax.errors import InputError, NonFiniteError
from prunesae_jax.models import PRUNABLE, block, embed, forward, init_params
from prunesae_jax.models.convert import export_hf_folder, from_transformers
from prunesae_jax.pruning import METHOD_GROUPS, METHODS, PruneArgs, apply_masks, parse_group, prune
from prunesae_jax.pruning.calibrate import block_with_inputs, calibration_batch, check_calib_tokens
from prunesae_jax.pruning.masks import prunable_items
from prunesae_jax.testing import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    spec = importlib.util.spec_from_file_location('bench_prune', os.path.join(ROOT, 'bench', 'prune.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tokens(cfg, n=8, T=24, seed=0):
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, (n, T)).astype(np.int32)


@pytest.mark.parametrize('family', ['llama', 'gemma2', 'gemma3_text'])
def test_block_with_inputs_matches_decoder_block(family):
    cfg = tiny_config(family)
    params = init_params(cfg, 1)
    h = embed(cfg, params, jnp.asarray(_tokens(cfg, 2)))
    for i in (0, 3):
        lp = params['layers'][i]
        out, ins = jax.jit(block_with_inputs, static_argnums=(0, 2))(cfg, lp, i, h)
        np.testing.assert_allclose(np.asarray(out), np.asarray(block(cfg, lp, i, h)), atol=1e-5, rtol=1e-5)
        assert {k: v.shape[-1] for k, v in ins.items()} == {
            'attn_in': cfg.hidden_size,
            'o_in': cfg.num_heads * cfg.head_dim,
            'mlp_in': cfg.hidden_size,
            'down_in': cfg.intermediate_size,
        }


@pytest.mark.parametrize('family', ['llama', 'gemma3_text'])
def test_sequential_wanda_matches_pytorch_reference(family, make_hf_model):
    cfg = tiny_config(family)
    hf = make_hf_model(cfg, seed=3)
    cfg2, params = from_transformers(hf)
    tokens = _tokens(cfg, n=8, T=24, seed=1)
    res = prune(cfg2, params, 'wanda', 0.5, calib_tokens=tokens, batch_size=4, progress=False)
    ref = _bench().torch_wanda(hf, tokens, 0.5, batch_size=4)  # prunes hf in place
    mism = []
    for i, name, keep in prunable_items(res.masks):
        mism.append(float((np.asarray(keep) != ref[(i, name)].T).mean()))
    print(f'{family}: max fraction of mask entries differing from the PyTorch reference: {max(mism):.2e}')
    assert max(mism) <= 2e-3  # float32 rounding may flip a near tie deep in the stack
    assert float(np.mean(mism)) <= 5e-4
    # exactly half of every output row's inputs are pruned
    for _, _, keep in prunable_items(res.masks):
        k = np.asarray(keep)
        assert (k.sum(0) == k.shape[0] - k.shape[0] // 2).all()
    # the pruned torch model and our pruned params agree on logits
    import torch

    with torch.no_grad():
        hf_logits = hf(torch.as_tensor(tokens[:2], dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward(cfg2, res.params, jnp.asarray(tokens[:2])))
    if max(mism) == 0:
        np.testing.assert_allclose(ours, hf_logits, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope='module')
def tiny():
    cfg = tiny_config('gemma3_text')
    params = init_params(cfg, 0)
    return cfg, params, _tokens(cfg, n=8, T=24, seed=2)


def test_sequential_differs_from_one_shot_after_block_zero(tiny):
    cfg, params, tokens = tiny
    seq = prune(cfg, params, 'wanda', 0.5, group='per_matrix', calib_tokens=tokens, progress=False)
    one = prune(cfg, params, 'wanda', 0.5, group='per_matrix', calib_tokens=tokens, sequential=False, progress=False)
    diff = {
        (i, n): float((np.asarray(a) != np.asarray(b)).mean())
        for (i, n, a), (_, _, b) in zip(prunable_items(seq.masks), prunable_items(one.masks))
    }
    assert all(diff[(0, n)] == 0 for n in PRUNABLE)  # block 0 sees the same embeddings
    assert sum(diff[(i, n)] for i in range(1, 4) for n in PRUNABLE) > 0
    for r in (seq.report, one.report):
        assert r['n_pruned'] == sum(int(np.prod(w.shape)) // 2 for _, _, w in prunable_items(params))
    assert seq.report['sequential'] is True and one.report['sequential'] is False
    assert seq.report['group'] == 'per_matrix' and seq.report['n_calib_tokens'] == tokens.size


@pytest.mark.parametrize('method', ['magnitude', 'wanda'])  # sparsegpt N:M: test_sparsegpt.py
def test_nm_holds_in_every_group(tiny, method):
    cfg, params, tokens = tiny
    res = prune(cfg, params, method, nm=(2, 4), calib_tokens=tokens, progress=False)
    for i, name, keep in prunable_items(res.masks):
        k = np.asarray(keep)
        assert (k.reshape(-1, 4, k.shape[1]).sum(1) == 2).all(), (i, name)
        w = np.asarray(res.params['layers'][i][name])
        assert (w[~k] == 0).all()
    assert res.report['overall'] == 0.5 and res.report['nm'] == (2, 4)


def test_magnitude_groups_and_exported_hf_model_matches_masked_forward(tiny, tmp_path):
    import torch
    import transformers

    cfg, params, tokens = tiny
    glob = prune(cfg, params, 'magnitude', 0.3, group='global', progress=False)
    per = prune(cfg, params, 'magnitude', 0.3, progress=False)
    total = glob.report['n_total']
    assert glob.report['n_pruned'] == int(total * 0.3)
    assert per.report['n_pruned'] == sum(int(np.prod(w.shape) * 0.3) for _, _, w in prunable_items(params))
    assert all(abs(v - 0.3) < 1e-3 for v in per.report['per_matrix'].values())  # exact in every matrix
    fr = glob.report['per_kind']  # global: one threshold, uneven fractions
    print(f'global magnitude 30%: attention {fr["attention"]:.4f}, mlp {fr["mlp"]:.4f}')
    assert max(abs(v - 0.3) for v in glob.report['per_matrix'].values()) > 0.01
    # SparseGPT on a config whose 7 matrices share one shape (one compilation of the OBS loop)
    cfg_sq = tiny_config('llama', num_kv_heads=4, intermediate_size=64, num_layers=2)
    params_sq = init_params(cfg_sq, 5)
    sgpt = prune(cfg_sq, params_sq, 'sparsegpt', 0.5, calib_tokens=tokens, block_size=32, progress=False)
    assert sgpt.report['n_pruned'] == sgpt.report['n_total'] // 2
    changed = [
        float(
            np.mean(
                np.asarray(sgpt.params['layers'][1][n])[np.asarray(sgpt.masks['layers'][1][n])]
                != np.asarray(params_sq['layers'][1][n])[np.asarray(sgpt.masks['layers'][1][n])]
            )
        )
        for n in PRUNABLE
    ]
    assert min(changed) > 0.5  # SparseGPT updates the kept weights, unlike a mask
    for name, c, p, res in (('global', cfg, params, glob), ('sparsegpt', cfg_sq, params_sq, sgpt)):
        masked = apply_masks(res.params, res.masks)
        ours = np.asarray(forward(c, masked, jnp.asarray(tokens[:2])))
        path = export_hf_folder(c, res.params, str(tmp_path / name), res.masks)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation='eager'
        ).eval()
        with torch.no_grad():
            theirs = hf(torch.as_tensor(tokens[:2], dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
        n_zero = sum(
            int((p.detach().numpy() == 0).sum()) for n, p in hf.named_parameters() if n.split('.')[-2] in PRUNABLE
        )
        assert n_zero == res.report['n_pruned']


def test_errors(tiny):
    cfg, params, tokens = tiny
    with pytest.raises(ValueError, match=r"method='obs' is not valid; accepted: magnitude \| wanda"):
        prune(cfg, params, 'obs', 0.5)
    with pytest.raises(
        ValueError, match=r"group='per_col' is not valid for magnitude; accepted: per_row \| per_matrix \| global"
    ):
        prune(cfg, params, 'magnitude', 0.5, group='per_col')
    with pytest.raises(ValueError, match=r"group='global' is not valid for wanda; accepted: per_row \| per_matrix"):
        prune(cfg, params, 'wanda', 0.5, group='global', calib_tokens=tokens)
    for s in (1.0, -0.01, 2):
        with pytest.raises(ValueError, match=r'sparsity=.* is not valid; accepted: a number in \[0, 1\)'):
            prune(cfg, params, 'magnitude', s)
    with pytest.raises(ValueError, match='1 <= N < M'):
        prune(cfg, params, 'magnitude', nm=(4, 4))
    with pytest.raises(ValueError, match='not divisible by M=5'):
        prune(cfg, params, 'magnitude', nm=(2, 5))
    with pytest.raises(ValueError, match='contradicts nm=2:4'):
        prune(cfg, params, 'wanda', 0.3, nm=(2, 4), calib_tokens=tokens)
    with pytest.raises(ValueError, match='calib_tokens is None'):
        prune(cfg, params, 'wanda', 0.5)
    with pytest.raises(ValueError, match=r'shape \(0, 24\)'):
        prune(cfg, params, 'wanda', 0.5, calib_tokens=np.zeros((0, 24), np.int32))
    with pytest.raises(ValueError, match='seq_len 1 is too short'):
        check_calib_tokens(np.zeros((4, 1), np.int32))
    with pytest.raises(ValueError, match='stream is empty'):
        calibration_batch([], 4, 16)
    with pytest.raises(ValueError, match='stream has 10 tokens; expected at least 15'):
        calibration_batch(np.arange(10), 4, 16, bos_token_id=1)
    bad = {**params, 'layers': [dict(l) for l in params['layers']]}
    bad['layers'][0]['input_norm'] = bad['layers'][0]['input_norm'].at[0].set(jnp.inf)
    with pytest.raises(
        NonFiniteError,
        match=r"calibration statistics of input 'attn_in'; "
        r'stage=calibration, condition=None, layer=0, step=0',
    ):
        prune(cfg, bad, 'wanda', 0.5, calib_tokens=tokens)


def test_calibration_batch_shape_bos_and_determinism():
    stream = np.arange(5, 1000)
    a = calibration_batch(stream, 6, 32, bos_token_id=1, seed=0)
    assert a.shape == (6, 32) and a.dtype == np.int32 and (a[:, 0] == 1).all()
    assert (np.diff(a[:, 1:], axis=1) == 1).all()  # contiguous windows of the stream
    np.testing.assert_array_equal(a, calibration_batch(stream, 6, 32, bos_token_id=1, seed=0))


def test_prune_args_resolve_defaults_and_refuse_bad_fields():
    assert PruneArgs('magnitude', 0.5).group == 'per_matrix'
    assert PruneArgs('wanda', 0.5, '').group == 'per_row'
    args = PruneArgs('sparsegpt', None, nm=(2, 4))
    assert (args.sparsity, args.group, args.nm) == (0.5, None, (2, 4))
    assert parse_group('2:4') == (None, (2, 4)) and parse_group('') == (None, None)
    assert parse_group('global') == ('global', None)
    bad = [
        (lambda: parse_group('4:2'), r"group='4:2' is not valid; accepted: an N:M pattern"),
        (lambda: PruneArgs('sparsegpt', 0.5, 'per_row'), "group='per_row' is not valid for sparsegpt"),
        (lambda: PruneArgs('wanda', 0.5, sequential=1), 'sequential=1 is not valid; accepted: True'),
        (lambda: PruneArgs('wanda', 0.5, batch_size=0), 'batch_size=0 is not valid; accepted'),
        (lambda: PruneArgs('wanda'), 'sparsity=None is not valid without nm'),
        (lambda: PruneArgs('magnitude', 0.5, 'per_row', (2, 4)), "group='per_row' is not valid with nm"),
    ]
    for make, match in bad:
        with pytest.raises(InputError, match=match) as info:
            make()
        assert '\n' not in str(info.value)
    assert set(METHOD_GROUPS) == set(METHODS)
