"""Conversion: HF folders (single/sharded, bf16), state dicts, export round trips, load dispatch, bad input."""

import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from prunesae_jax.models import forward, init_params
from prunesae_jax.models.convert import (
    export_hf_folder,
    from_hf_state_dict,
    from_transformers,
    load,
    load_hf_folder,
    load_tokenizer,
    to_hf_state_dict,
)
from prunesae_jax.testing import tiny_config


def _tokens(cfg, B=2, T=12, seed=0):
    return np.random.RandomState(seed).randint(3, cfg.vocab_size, size=(B, T)).astype(np.int32)


def _random_params(cfg, seed):
    """init_params with norms moved off identity, so a dropped or misnamed norm changes the logits."""
    params = init_params(cfg, seed)
    rng = np.random.RandomState(seed)

    def jitter(path, x):
        name = jax.tree_util.keystr(path)
        if 'norm' in name:
            return (x + 0.3 * rng.standard_normal(x.shape)).astype(x.dtype)
        return x * 20  # std 0.4: logits of order one

    return jax.tree_util.tree_map_with_path(jitter, params)


def _same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb)
    )


def _hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize(
    'family,overrides', [('llama', {}), ('gemma2', {}), ('gemma3_text', {'tie_word_embeddings': False})]
)
def test_export_round_trip_through_transformers(tmp_path, family, overrides):
    import transformers

    cfg = tiny_config(family, **overrides)
    params = _random_params(cfg, 1)
    path = export_hf_folder(cfg, params, tmp_path / 'out')
    assert sorted(os.listdir(path)) == ['config.json', 'model.safetensors']  # no temp files left behind
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager')
    assert (
        type(hf).__name__
        == {'llama': 'LlamaForCausalLM', 'gemma2': 'Gemma2ForCausalLM', 'gemma3_text': 'Gemma3ForCausalLM'}[family]
    )
    tokens = _tokens(cfg)
    ref = _hf_logits(hf, tokens)
    ours = np.asarray(forward(cfg, params, jnp.asarray(tokens)))
    assert np.abs(ref).max() > 0.5
    assert np.abs(ours - ref).max() <= 1e-4
    cfg2, params2 = load_hf_folder(path)
    assert cfg2 == cfg and _same(params2, params)
    cfg3, params3 = load(str(path))  # dispatch on an existing folder
    assert cfg3 == cfg and _same(params3, params)


def test_export_with_masks_zeroes_pruned_weights(tmp_path):
    cfg = tiny_config('llama')
    params = _random_params(cfg, 2)
    rng = np.random.RandomState(0)
    masks = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            (rng.rand(*x.shape) > 0.5) if jax.tree_util.keystr(p).split("'")[-2] in ('q_proj', 'down_proj') else None
        ),
        params,
    )
    export_hf_folder(cfg, params, tmp_path, masks=masks)
    _, loaded = load_hf_folder(tmp_path)
    for i in range(cfg.num_layers):
        for name in ('q_proj', 'down_proj'):
            m = masks['layers'][i][name]
            w = np.asarray(loaded['layers'][i][name])
            assert np.all(w[~m] == 0) and np.array_equal(w[m], np.asarray(params['layers'][i][name])[m])
        assert np.array_equal(loaded['layers'][i]['k_proj'], params['layers'][i]['k_proj'])
    assert abs(float(np.mean(np.asarray(loaded['layers'][0]['q_proj']) == 0)) - 0.5) < 0.05


def test_bf16_folder_round_trip(tmp_path):
    cfg = tiny_config('gemma3_text', dtype='bfloat16')
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _random_params(cfg.replace(dtype='float32'), 3))
    export_hf_folder(cfg, params, tmp_path)
    with open(tmp_path / 'config.json') as f:
        assert json.load(f)['torch_dtype'] == 'bfloat16'
    cfg2, params2 = load_hf_folder(tmp_path, dtype='bfloat16')
    assert cfg2 == cfg and _same(params2, params)
    assert params2['layers'][0]['q_proj'].dtype == jnp.bfloat16
    # Upcasting on load is exact.
    _, params32 = load_hf_folder(tmp_path, dtype='float32')
    assert np.array_equal(np.asarray(params32['embed']), np.asarray(params['embed']).astype(np.float32))


def test_sharded_folders_hf_saved_and_hand_made(tmp_path, make_hf_model):
    cfg = tiny_config('gemma2')
    hf = make_hf_model(cfg, seed=4)
    hf.save_pretrained(tmp_path / 'hf', max_shard_size='60KB')
    files = os.listdir(tmp_path / 'hf')
    assert 'model.safetensors.index.json' in files and sum(f.endswith('.safetensors') for f in files) > 2
    cfg_ref, params_ref = from_transformers(hf)
    cfg2, params2 = load_hf_folder(tmp_path / 'hf')
    assert cfg2 == cfg_ref and _same(params2, params_ref)
    tokens = _tokens(cfg)
    assert np.abs(np.asarray(forward(cfg2, params2, jnp.asarray(tokens))) - _hf_logits(hf, tokens)).max() <= 1e-4

    # Two shards without an index: every *.safetensors is read.
    from safetensors.numpy import save_file

    sd = to_hf_state_dict(cfg_ref, params_ref)
    keys = sorted(sd)
    (tmp_path / 'plain').mkdir()
    save_file({k: sd[k] for k in keys[::2]}, str(tmp_path / 'plain' / 'a.safetensors'))
    save_file({k: sd[k] for k in keys[1::2]}, str(tmp_path / 'plain' / 'b.safetensors'))
    (tmp_path / 'plain' / 'config.json').write_text(json.dumps(cfg_ref.to_hf_dict()))
    assert _same(load_hf_folder(tmp_path / 'plain')[1], params_ref)


def test_state_dict_with_numpy_bf16_and_prefixes():
    cfg = tiny_config('gemma3_text')
    params = _random_params(cfg, 5)
    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in to_hf_state_dict(cfg, params).items()}
    # A multimodal Gemma 3 checkpoint prefixes the language model.
    sd = {k.replace('model.', 'model.language_model.', 1): v for k, v in sd.items()}
    cfg2, p2 = from_hf_state_dict(cfg.to_hf_dict(), sd, dtype='bfloat16')
    assert cfg2 == cfg.replace(dtype='bfloat16')
    assert np.array_equal(
        np.asarray(p2['layers'][1]['k_proj']), np.asarray(params['layers'][1]['k_proj']).astype(ml_dtypes.bfloat16)
    )


def test_bad_input_one_line_errors(tmp_path):
    cfg = tiny_config('llama')
    params = _random_params(cfg, 6)
    good = tmp_path / 'good'
    export_hf_folder(cfg, params, good)
    sd = to_hf_state_dict(cfg, params)

    def one_line(excinfo):
        assert '\n' not in str(excinfo.value)

    hf_dict = cfg.to_hf_dict()
    with pytest.raises(
        ValueError,
        match=r"model_type='mistral' is not supported; supported: \('llama', 'gemma2', "
        r"'gemma3_text'\)",
    ) as e:
        from_hf_state_dict({**hf_dict, 'model_type': 'mistral'}, sd)
    one_line(e)
    bad = tmp_path / 'bad_type'
    bad.mkdir()
    (bad / 'config.json').write_text(json.dumps({**hf_dict, 'model_type': 'qwen2'}))
    with pytest.raises(ValueError, match="model_type='qwen2' is not supported"):
        load_hf_folder(bad)

    with pytest.raises(ValueError, match=r"tensor 'model.layers.2.mlp.up_proj.weight' is missing") as e:
        from_hf_state_dict(hf_dict, {k: v for k, v in sd.items() if k != 'model.layers.2.mlp.up_proj.weight'})
    one_line(e)
    with pytest.raises(
        ValueError,
        match=r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(64, 64\); "
        r'the config expects \(32, 64\)',
    ) as e:
        from_hf_state_dict(hf_dict, {**sd, 'model.layers.0.self_attn.k_proj.weight': np.zeros((64, 64), np.float32)})
    one_line(e)
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        from_hf_state_dict(hf_dict, sd, dtype='int8')

    # A truncated weight file.
    trunc = tmp_path / 'trunc'
    trunc.mkdir()
    (trunc / 'config.json').write_text((good / 'config.json').read_text())
    data = (good / 'model.safetensors').read_bytes()
    (trunc / 'model.safetensors').write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match='is corrupt or unreadable') as e:
        load_hf_folder(trunc)
    one_line(e)
    # An index naming a shard that is not there.
    (trunc / 'model.safetensors').unlink()
    (trunc / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': {k: 'gone.safetensors' for k in sd}}))
    with pytest.raises(FileNotFoundError, match='gone.safetensors'):
        load_hf_folder(trunc)
    (trunc / 'model.safetensors.index.json').unlink()
    with pytest.raises(FileNotFoundError, match=r'no \*.safetensors weights'):
        load_hf_folder(trunc)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_hf_folder(tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError, match='config.json'):
        load_hf_folder(_empty(tmp_path))

    with pytest.raises(FileNotFoundError, match='not a model folder or .gguf file'):
        load(str(tmp_path / 'missing_folder'))
    with pytest.raises(FileNotFoundError, match='GGUF file'):
        load(str(tmp_path / 'x.gguf'))
    with pytest.raises(ValueError, match='is a file; expected a folder'):
        export_hf_folder(cfg, params, good / 'config.json')


def _empty(tmp_path):
    p = tmp_path / 'empty'
    p.mkdir(exist_ok=True)
    return p


def test_hub_id_offline_names_the_local_folder_alternative(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path))
    with pytest.raises(ValueError, match=r"could not fetch hub model 'google/gemma-3-1b-pt'.*local folder") as e:
        load('google/gemma-3-1b-pt')
    assert '\n' not in str(e.value)


def test_load_dispatches_to_gguf_and_zoo(monkeypatch, tmp_path):
    cfg = tiny_config('gemma3_text')
    params = init_params(cfg, 0)
    calls = []

    gguf_mod = types.ModuleType('prunesae_jax.models.gguf')
    gguf_mod.load_gguf = lambda path: (calls.append(('gguf', path)), (cfg, params))[1]
    zoo_mod = types.ModuleType('prunesae_jax.models.zoo')
    zoo_mod.load_zoo = lambda name, dtype='float32': (calls.append(('zoo', name, dtype)), (cfg, params, 'tok'))[1]
    zoo_mod.load_tokenizer = lambda name: ('tokenizer of', name)
    import prunesae_jax.models as models_pkg

    for name, mod in (('gguf', gguf_mod), ('zoo', zoo_mod)):
        monkeypatch.setitem(sys.modules, f'prunesae_jax.models.{name}', mod)
        monkeypatch.setattr(models_pkg, name, mod, raising=False)

    f = tmp_path / 'm.gguf'
    f.write_bytes(b'GGUF')
    c, p = load(str(f), dtype='bfloat16')  # a loader without dtype gets its output cast
    assert calls[-1] == ('gguf', str(f)) and c.dtype == 'bfloat16' and p['embed'].dtype == jnp.bfloat16
    c, p = load('gemma-3-270m')
    assert calls[-1] == ('zoo', 'gemma-3-270m', 'float32') and c == cfg and p is params
    assert load_tokenizer('smollm2-135m') == ('tokenizer of', 'smollm2-135m')


def test_load_tokenizer_from_folder(tmp_path):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({'<unk>': 0, 'hello': 1, 'world': 2}, unk_token='<unk>'))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token='<unk>').save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path))('hello world hello').input_ids == [1, 2, 1]
