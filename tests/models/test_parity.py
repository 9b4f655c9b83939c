"""Golden-logit parity of the JAX decoder against transformers' PyTorch models (tiny random configs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunesae_jax.models import block, block_linear_inputs, embed, forward, init_params, resid_post, unembed
from prunesae_jax.models.config import DecoderConfig
from prunesae_jax.models.convert import from_transformers
from prunesae_jax.testing import tiny_config

TOL = 1e-4
T = 24  # longer than the tiny sliding window (8)

LLAMA3_SCALING = {
    'rope_type': 'llama3',
    'factor': 8.0,
    'low_freq_factor': 1.0,
    'high_freq_factor': 4.0,
    'original_max_position_embeddings': 16,
}

CASES = {
    'llama_untied': ('llama', {}),
    'llama_tied': ('llama', {'tie_word_embeddings': True}),
    'llama3_rope': ('llama', {'rope_scaling': LLAMA3_SCALING, 'rope_theta': 500_000.0}),
    'llama_mha': ('llama', {'num_kv_heads': 4}),
    # small caps so the tanh soft-capping actually bites on these logits
    'gemma2_softcap': ('gemma2', {'attn_logit_softcapping': 2.0, 'final_logit_softcapping': 3.0}),
    'gemma2_untied': ('gemma2', {'tie_word_embeddings': False, 'query_pre_attn_scalar': 16.0}),
    'gemma3': ('gemma3_text', {}),
    # (HF's Gemma 3 applies only the final soft-capping; attention soft-capping is Gemma 2's.)
    'gemma3_linear_rope_softcap': (
        'gemma3_text',
        {'rope_scaling': {'rope_type': 'linear', 'factor': 8.0}, 'final_logit_softcapping': 3.0},
    ),
}


def _tokens(cfg, B=2, T=T, seed=0):
    return np.random.RandomState(seed).randint(3, cfg.vocab_size, size=(B, T)).astype(np.int32)


def _hf_run(model, tokens, attention_mask=None, position_ids=None):
    import torch

    kw = {}
    if attention_mask is not None:
        kw['attention_mask'] = torch.tensor(attention_mask)
    if position_ids is not None:
        kw['position_ids'] = torch.tensor(position_ids)
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), output_hidden_states=True, **kw)


@pytest.fixture(scope='module')
def models(make_hf_model):
    built = {}
    for name, (family, overrides) in CASES.items():
        cfg = tiny_config(family, **overrides)
        hf = make_hf_model(cfg, seed=len(built))
        built[name] = (cfg, hf)
    return built


@pytest.mark.parametrize('case', list(CASES))
def test_logits_and_hidden_states_match_transformers(models, case):
    cfg, hf = models[case]
    cfg2, params = from_transformers(hf)
    assert cfg2 == cfg  # to_hf_dict -> transformers -> from_hf round-trips every field
    tokens = _tokens(cfg)
    out = _hf_run(hf, tokens)
    ref = out.logits.numpy()
    logits = np.asarray(forward(cfg, params, jnp.asarray(tokens)))
    assert logits.dtype == np.float32 and logits.shape == (2, T, cfg.vocab_size)
    assert np.abs(ref).max() > 1.0  # non-trivial logits
    assert np.abs(logits - ref).max() <= TOL

    # hidden_states[0] is the (scaled) embedding; [l+1] the output of block l, except that transformers
    # ties the last entry to last_hidden_state (after the final norm).
    hs = [h.numpy() for h in out.hidden_states]
    assert len(hs) == cfg.num_layers + 1
    np.testing.assert_allclose(np.asarray(embed(cfg, params, jnp.asarray(tokens))), hs[0], atol=TOL, rtol=0)
    resid = resid_post(cfg, params, jnp.asarray(tokens), layers=tuple(range(cfg.num_layers)))
    for l in range(cfg.num_layers - 1):
        assert np.abs(np.asarray(resid[l]) - hs[l + 1]).max() <= TOL * max(1.0, np.abs(hs[l + 1]).max())

    # The raw output of the last block, captured with a hook, and HF's post-norm last entry.
    import torch

    captured = {}
    handle = hf.model.layers[-1].register_forward_hook(
        lambda m, i, o: captured.update(h=o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        hf(torch.tensor(tokens, dtype=torch.long))
    handle.remove()
    last = np.asarray(resid[cfg.num_layers - 1])
    assert np.abs(last - captured['h'].numpy()).max() <= TOL * max(1.0, np.abs(last).max())
    normed = hf.model.norm(torch.tensor(last)).detach().numpy()
    assert np.abs(normed - hs[-1]).max() <= TOL


@pytest.mark.parametrize('case', ['llama_untied', 'gemma2_softcap', 'gemma3'])
def test_padded_batches_match_transformers(models, case):
    """Right and left padding: real positions match HF given the same (real-token) positions."""
    cfg, hf = models[case]
    _, params = from_transformers(hf)
    tokens = _tokens(cfg, B=3, seed=1)
    mask = np.ones_like(tokens)
    mask[0, 17:] = 0  # right padding
    mask[1, :6] = 0  # left padding
    tokens = np.where(mask == 1, tokens, cfg.pad_token_id).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = _hf_run(hf, tokens, attention_mask=mask, position_ids=positions).logits.numpy()
    logits = np.asarray(forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.isfinite(logits).all()
    assert np.abs(logits[real] - ref[real]).max() <= TOL

    # A left-padded row computes exactly what the unpadded sequence computes.
    alone = np.asarray(forward(cfg, params, jnp.asarray(tokens[1:2, 6:])))
    assert np.abs(logits[1, 6:] - alone[0]).max() <= 1e-5
    res = resid_post(cfg, params, jnp.asarray(tokens), jnp.asarray(mask), layers=(2,))
    res_alone = resid_post(cfg, params, jnp.asarray(tokens[1:2, 6:]), layers=(2,))
    ref_res = np.asarray(res_alone[2])[0]
    assert np.abs(np.asarray(res[2])[1, 6:] - ref_res).max() <= 1e-6 * max(1.0, np.abs(ref_res).max()) * 10


@pytest.mark.parametrize('case', ['llama_untied', 'gemma3'])
def test_block_sequential_equals_forward(models, case):
    cfg, hf = models[case]
    _, params = from_transformers(hf)
    tokens = jnp.asarray(_tokens(cfg, seed=2))
    mask = jnp.ones_like(tokens).at[0, 20:].set(0)
    h = embed(cfg, params, tokens)
    for i in range(cfg.num_layers):
        h = block(cfg, params['layers'][i], i, h, mask)
    full = forward(cfg, params, tokens, mask)
    assert float(jnp.abs(unembed(cfg, params, h) - full).max()) <= 1e-5


@pytest.mark.parametrize('case', ['llama_untied', 'gemma2_softcap'])
def test_block_linear_inputs_match_transformers(models, case):
    """The inputs each prunable linear layer sees (Wanda's statistics) equal HF's, layer 1."""
    cfg, hf = models[case]
    _, params = from_transformers(hf)
    tokens = _tokens(cfg, seed=3)
    seen = {}
    layer = hf.model.layers[1]
    mods = {
        n: getattr(layer.self_attn if n in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else layer.mlp, n)
        for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
    }
    handles = [
        m.register_forward_pre_hook(lambda m, a, n=n: seen.update({n: a[0].numpy().copy()})) for n, m in mods.items()
    ]
    out = _hf_run(hf, tokens)
    for hd in handles:
        hd.remove()
    h0 = jnp.asarray(out.hidden_states[1].numpy())
    h1, inputs = block_linear_inputs(cfg, params['layers'][1], 1, h0)
    assert set(inputs) == set(mods)
    for n in mods:
        ref = seen[n]
        assert np.abs(np.asarray(inputs[n]) - ref).max() <= TOL * max(1.0, np.abs(ref).max()), n
    assert np.abs(np.asarray(h1) - out.hidden_states[2].numpy()).max() <= TOL * 10


def test_resid_post_stops_early_and_skips_unembedding():
    cfg = tiny_config('llama')
    params = init_params(cfg, 0)
    tokens = jnp.asarray(_tokens(cfg))
    ref = resid_post(cfg, params, tokens, layers=(1,))[1]
    # Later layers and the head poisoned with NaN leave the capture untouched.
    nan_layers = [jax.tree.map(lambda x: x * jnp.nan, lp) for lp in params['layers'][2:]]
    poisoned = dict(
        params,
        lm_head=params['lm_head'] * jnp.nan,
        final_norm=params['final_norm'] * jnp.nan,
        layers=params['layers'][:2] + nan_layers,
    )
    got = resid_post(cfg, poisoned, tokens, layers=(1,))[1]
    assert np.array_equal(np.asarray(got), np.asarray(ref))

    # Compiled work grows with the last requested layer: 9 matmuls per block (q,k,v,qk,pv,o,gate,up,down).
    def n_dots(layers):
        jaxpr = jax.make_jaxpr(lambda p, t: resid_post(cfg, p, t, layers=layers))(params, tokens)
        return str(jaxpr).count('dot_general')

    assert n_dots((0,)) == 9
    assert n_dots((0, 2)) == 27


def test_resid_post_layer_out_of_range():
    cfg = tiny_config('gemma3_text')
    params = init_params(cfg, 0)
    tokens = jnp.asarray(_tokens(cfg))
    with pytest.raises(ValueError, match='layer index 4 is out of range'):
        resid_post(cfg, params, tokens, layers=(4,))
    with pytest.raises(ValueError, match='out of range'):
        block(cfg, params['layers'][0], 7, embed(cfg, params, tokens))
    # negative indices count from the end, like Python
    assert list(resid_post(cfg, params, tokens, layers=(-1,))) == [3]


def test_init_params_deterministic_and_shaped():
    cfg = tiny_config('gemma3_text', tie_word_embeddings=False)
    a, b = init_params(cfg, 3), init_params(cfg, 3)
    c = init_params(cfg, 4)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not np.array_equal(a['embed'], c['embed'])
    assert a['lm_head'].shape == (64, 128) and a['embed'].shape == (128, 64)
    lp = a['layers'][0]
    llama = {'input_norm', 'pre_mlp_norm', 'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'}
    assert set(lp) == llama | {'post_attn_norm', 'post_mlp_norm', 'q_norm', 'k_norm'}
    assert lp['q_proj'].shape == (64, 64) and lp['k_proj'].shape == (64, 32) and lp['down_proj'].shape == (128, 64)
    assert set(init_params(tiny_config('llama'), 0)['layers'][0]) == llama


@pytest.mark.parametrize(
    'case,dtype',
    [('llama_untied', 'bfloat16'), ('gemma2_softcap', 'float16'), ('gemma3', 'bfloat16'), ('gemma3', 'float16')],
)
def test_half_precision_close_to_fp32(models, case, dtype):
    cfg, hf = models[case]
    _, params32 = from_transformers(hf)
    cfg_h = cfg.replace(dtype=dtype)
    params_h = jax.tree.map(lambda x: x.astype(dtype), params32)
    tokens = jnp.asarray(_tokens(cfg))
    ref = np.asarray(forward(cfg, params32, tokens))
    got = forward(cfg_h, params_h, tokens)
    assert got.dtype == jnp.float32
    assert resid_post(cfg_h, params_h, tokens, layers=(1,))[1].dtype == jnp.dtype(dtype)
    err = np.abs(np.asarray(got) - ref)
    scale = np.abs(ref).max()
    # bf16 carries 8 mantissa bits, fp16 11; errors compound over 4 layers.
    assert err.max() <= (0.08 if dtype == 'bfloat16' else 0.01) * scale
    assert np.mean(np.argmax(np.asarray(got), -1) == np.argmax(ref, -1)) >= 0.9


def test_gemma_embedding_scale_rounded_to_activation_dtype(make_hf_model):
    """sqrt(48) = 6.928... becomes 6.9375 in bf16; the reference multiplies by the rounded value."""
    import torch

    cfg = tiny_config('gemma2', hidden_size=48, dtype='bfloat16')
    hf = make_hf_model(cfg, seed=5, dtype='bfloat16')
    cfg2, params = from_transformers(hf)
    assert cfg2.dtype == 'bfloat16' and params['embed'].dtype == jnp.bfloat16
    tokens = _tokens(cfg)
    h = np.asarray(embed(cfg2, params, jnp.asarray(tokens))).astype(np.float32)
    ref = _hf_run(hf, tokens).hidden_states[0].float().numpy()
    assert np.array_equal(h, ref)
    raw = np.asarray(params['embed'])[tokens].astype(np.float32)
    assert np.array_equal(h, (raw * 6.9375).astype(jnp.bfloat16).astype(np.float32))
    # ... and the whole bf16 forward stays close to transformers' bf16 forward.
    with torch.no_grad():
        ref_logits = hf(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    got = np.asarray(forward(cfg2, params, jnp.asarray(tokens)))
    assert np.abs(got - ref_logits).max() <= 0.05 * np.abs(ref_logits).max()


def test_config_from_hf_old_style_keys():
    """config.json files on the Hub still carry rope_theta / rope_scaling / rope_local_base_freq."""
    old = {
        'model_type': 'gemma3_text',
        'vocab_size': 262144,
        'hidden_size': 1152,
        'intermediate_size': 6912,
        'num_hidden_layers': 26,
        'num_attention_heads': 4,
        'num_key_value_heads': 1,
        'head_dim': 256,
        'rope_theta': 1000000.0,
        'rope_local_base_freq': 10000.0,
        'rope_scaling': None,
        'sliding_window': 512,
        'sliding_window_pattern': 6,
        'query_pre_attn_scalar': 256,
        'rms_norm_eps': 1e-06,
        'hidden_activation': 'gelu_pytorch_tanh',
        'final_logit_softcapping': None,
        'attn_logit_softcapping': None,
        'bos_token_id': 2,
        'eos_token_id': [1, 106],
        'pad_token_id': 0,
        'max_position_embeddings': 32768,
    }
    cfg = DecoderConfig.from_hf(old)
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4 and cfg.rope_scaling is None
    assert cfg.layer_types[:6] == ('sliding_attention',) * 5 + ('full_attention',)
    assert cfg.tie_word_embeddings and cfg.eos_token_id == (1, 106) and cfg.attn_scale == 256**-0.5
    hash(cfg)
    llama = {
        'model_type': 'llama',
        'vocab_size': 128256,
        'hidden_size': 2048,
        'intermediate_size': 8192,
        'num_hidden_layers': 16,
        'num_attention_heads': 32,
        'num_key_value_heads': 8,
        'rope_theta': 500000.0,
        'rope_scaling': {
            'factor': 32.0,
            'high_freq_factor': 4.0,
            'low_freq_factor': 1.0,
            'original_max_position_embeddings': 8192,
            'rope_type': 'llama3',
        },
        'tie_word_embeddings': True,
        'max_position_embeddings': 131072,
    }
    cfg = DecoderConfig.from_hf(llama)
    assert cfg.head_dim == 64 and dict(cfg.rope_scaling)['factor'] == 32.0 and cfg.rope_theta == 5e5
    with pytest.raises(ValueError, match=r"model_type='mistral' is not supported; supported: \('llama'"):
        DecoderConfig.from_hf({**llama, 'model_type': 'mistral'})


def test_config_validation_errors():
    with pytest.raises(ValueError, match="family='mistral' is not supported"):
        tiny_config('mistral')
    with pytest.raises(ValueError, match="dtype='float64' is not supported"):
        tiny_config('llama', dtype='float64')
    with pytest.raises(ValueError, match='num_heads=4 must be a multiple of num_kv_heads=3'):
        tiny_config('llama', num_kv_heads=3)
    with pytest.raises(ValueError, match='layer_types has 3 entries; expected num_layers=4'):
        tiny_config('gemma2', layer_types=('full_attention',) * 3)
    with pytest.raises(ValueError, match=r'qk_norm=1 is not accepted; expected True, False or None'):
        tiny_config('llama', qk_norm=1)
    cfg = tiny_config('gemma3_text', num_layers=8)
    assert cfg.layer_types.count('full_attention') == 2 and cfg.layer_types[7] == 'full_attention'
    assert hash(cfg) == hash(tiny_config('gemma3_text', num_layers=8))
