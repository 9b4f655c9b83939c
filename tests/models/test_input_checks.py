"""Checks where values enter the decoder: token ids against the vocabulary, checkpoint tensors (dtype
family, finiteness), and exports that every allowed transformers version reads with the same RoPE."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunesae_jax.errors import InputError
from prunesae_jax.models import (
    embed,
    export_hf_folder,
    forward,
    from_hf_state_dict,
    init_params,
    load_hf_folder,
    resid_post,
)
from prunesae_jax.models.convert import to_hf_state_dict
from prunesae_jax.models.generate import greedy_generate
from prunesae_jax.testing import tiny_config


@pytest.fixture(scope='module')
def llama():
    cfg = tiny_config('llama')  # vocab_size 128
    return cfg, init_params(cfg, 0)


# --------------------------------------------------------------------------- token ids


@pytest.mark.parametrize('fn', ['forward', 'resid_post', 'embed'])
def test_token_ids_past_the_vocabulary_are_refused(llama, fn):
    cfg, params = llama
    tokens = np.full((2, 5), 7, np.int32)
    tokens[1, 3] = cfg.vocab_size  # jnp.take would read NaN here: a "non-finite perplexity" much later
    call = {'forward': forward, 'resid_post': resid_post, 'embed': embed}[fn]
    with pytest.raises(InputError, match=r'token id 128 at index \(1, 3\); accepted: 0 <= id < vocab_size=128'):
        call(cfg, params, tokens)


def test_negative_token_ids_are_refused_not_wrapped(llama):
    cfg, params = llama
    tokens = jnp.asarray(np.array([[5, -1, 6]], np.int32))  # a jax array: checked on its host copy
    with pytest.raises(InputError, match=r'token id -1 at index \(0, 1\)'):
        forward(cfg, params, tokens)
    with pytest.raises(InputError, match=r'dtype float32; expected integer token ids'):
        forward(cfg, params, np.ones((1, 3), np.float32))
    with pytest.raises(InputError, match=r'attention_mask has shape \(1, 2\)'):
        resid_post(cfg, params, np.ones((1, 3), np.int32), np.ones((1, 2), np.int32))
    with pytest.raises(InputError, match='token id 300'):
        greedy_generate(cfg, params, np.array([[1, 300]]), 2)
    # valid ids up to vocab_size - 1 still run, also traced inside jit (greedy_generate's loop)
    assert np.isfinite(np.asarray(forward(cfg, params, np.array([[0, cfg.vocab_size - 1]], np.int32)))).all()
    assert np.asarray(greedy_generate(cfg, params, np.array([[1, 127]]), 2)).shape == (1, 4)


def test_generate_length_is_checked_against_the_context(llama):
    cfg, params = llama  # max_position_embeddings 256
    with pytest.raises(InputError, match=r'prompt length 2 \+ n_new=10000000 exceeds max_position_embeddings=256'):
        greedy_generate(cfg, params, np.array([[1, 5]]), 10**7)


# --------------------------------------------------------------------------- checkpoint tensors


def test_checkpoint_tensors_must_be_finite_floats(tmp_path):
    cfg = tiny_config('llama')
    sd = to_hf_state_dict(cfg, init_params(cfg, 1))
    hf = cfg.to_hf_dict()
    bad = dict(sd)
    bad['model.layers.1.mlp.down_proj.weight'] = sd['model.layers.1.mlp.down_proj.weight'].copy()
    bad['model.layers.1.mlp.down_proj.weight'][5, 9] = np.nan
    with pytest.raises(
        InputError,
        match=r"'model.layers.1.mlp.down_proj.weight' holds 1 non-finite value\(s\), "
        r'first nan at index \(5, 9\)',
    ):
        from_hf_state_dict(hf, bad)
    bad = {**sd, 'model.norm.weight': np.ones(cfg.hidden_size, np.int32)}
    with pytest.raises(InputError, match=r"'model.norm.weight' has dtype int32; accepted: a floating dtype"):
        from_hf_state_dict(hf, bad)
    big = {**sd, 'model.embed_tokens.weight': sd['model.embed_tokens.weight'] * np.float32(1e6)}
    with pytest.raises(InputError, match=r"overflows dtype='float16'"):
        from_hf_state_dict(hf, big, dtype='float16')
    # the same check on a folder read from disk (what load / load_hub / the zoo go through)
    export_hf_folder(cfg, init_params(cfg, 1), tmp_path / 'm')
    from safetensors.numpy import load_file, save_file

    t = load_file(str(tmp_path / 'm' / 'model.safetensors'))
    t['model.layers.0.self_attn.q_proj.weight'][0, 0] = np.inf
    save_file(t, str(tmp_path / 'm' / 'model.safetensors'))
    with pytest.raises(InputError, match=r"'model.layers.0.self_attn.q_proj.weight' holds 1 non-finite"):
        load_hf_folder(tmp_path / 'm')


def test_gguf_non_finite_tensor_is_refused(tmp_path):
    import gguf

    from prunesae_jax.models.gguf import read_gguf

    w = gguf.GGUFWriter(str(tmp_path / 'nan.gguf'), 'llama')
    for add, v in (
        (w.add_block_count, 1),
        (w.add_embedding_length, 8),
        (w.add_feed_forward_length, 16),
        (w.add_head_count, 2),
        (w.add_vocab_size, 4),
    ):
        add(v)
    emb = np.ones((4, 8), np.float32)
    emb[2, 3] = np.nan
    w.add_tensor('token_embd.weight', emb)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match=r"GGUF tensor 'token_embd.weight'.*non-finite.*\(2, 3\)"):
        read_gguf(tmp_path / 'nan.gguf')


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize(
    'family,overrides',
    [
        ('llama', {'rope_theta': 123456.0}),
        (
            'llama',
            {
                'rope_theta': 5e5,
                'rope_scaling': {
                    'rope_type': 'llama3',
                    'factor': 8.0,
                    'low_freq_factor': 1.0,
                    'high_freq_factor': 4.0,
                    'original_max_position_embeddings': 64,
                },
            },
        ),
        ('gemma2', {'rope_theta': 33333.0}),
        (
            'gemma3_text',
            {
                'rope_theta': 777777.0,
                'rope_local_theta': 2222.0,
                'rope_scaling': {'rope_type': 'linear', 'factor': 4.0},
            },
        ),
    ],
)
def test_export_writes_legacy_and_new_rope_keys_consistently(tmp_path, family, overrides):
    """transformers 4.x reads rope_theta / rope_scaling / rope_local_base_freq and ignores rope_parameters;
    5.x reads rope_parameters. Both must be there, with the same values, and each alone must give the
    same model (checked with the installed transformers by deleting the other set of keys)."""
    import torch
    import transformers

    cfg = tiny_config(family, **overrides)
    params = jax.tree.map(lambda x: x * 20 if x.ndim == 2 else x, init_params(cfg, 2))
    path = export_hf_folder(cfg, params, tmp_path / 'out')
    c = json.load(open(os.path.join(path, 'config.json')))
    rp = c['rope_parameters']
    glob = rp['full_attention'] if family == 'gemma3_text' else rp
    assert c['rope_theta'] == glob['rope_theta'] == cfg.rope_theta
    scaling = overrides.get('rope_scaling')
    assert c.get('rope_scaling') == scaling
    if scaling:
        assert {k: glob[k] for k in scaling} == scaling
    if family == 'gemma3_text':
        assert c['rope_local_base_freq'] == rp['sliding_attention']['rope_theta'] == cfg.rope_local_theta

    tokens = np.random.RandomState(0).randint(3, cfg.vocab_size, size=(2, 40)).astype(np.int32)  # > window 8
    ours = np.asarray(forward(cfg, params, tokens))
    legacy = {k: v for k, v in c.items() if k != 'rope_parameters'}
    new = {k: v for k, v in c.items() if k not in ('rope_theta', 'rope_scaling', 'rope_local_base_freq')}
    for name, d in (('legacy', legacy), ('new', new)):
        with open(os.path.join(path, 'config.json'), 'w') as f:
            json.dump(d, f)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager').eval()
        with torch.no_grad():
            ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
        assert np.abs(ref - ours).max() <= 5e-4, name  # a wrong RoPE base is off by O(1)


def test_export_saves_the_tokenizer_when_given(tmp_path):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = tiny_config('llama')
    params = init_params(cfg, 0)
    tk = Tokenizer(models.WordLevel({'<unk>': 0, 'hello': 1, 'world': 2}, unk_token='<unk>'))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token='<unk>')
    path = export_hf_folder(cfg, params, tmp_path / 'with_tok', tokenizer=tok)
    assert transformers.AutoTokenizer.from_pretrained(path)('hello world').input_ids == [1, 2]
    assert not [f for f in os.listdir(path) if f.startswith('.')]  # no temp folder left behind
    with pytest.raises(InputError, match='has no save_pretrained'):
        export_hf_folder(cfg, params, tmp_path / 'x', tokenizer='gpt2')
    big = {f'w{i}': i for i in range(cfg.vocab_size + 1)}
    big_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(big, unk_token='w0')))
    with pytest.raises(InputError, match=r'tokenizer has 129 tokens but the model vocab_size=128'):
        export_hf_folder(cfg, params, tmp_path / 'y', tokenizer=big_tok)


def test_malformed_hf_config_is_an_input_error(tmp_path):
    cfg = tiny_config('llama')
    export_hf_folder(cfg, init_params(cfg, 0), tmp_path / 'm')
    c = json.load(open(tmp_path / 'm' / 'config.json'))
    del c['num_hidden_layers']  # was a raw KeyError
    json.dump(c, open(tmp_path / 'm' / 'config.json', 'w'))
    with pytest.raises(InputError, match=r"HF config lacks \['num_hidden_layers'\]"):
        load_hf_folder(tmp_path / 'm')
    c['num_hidden_layers'] = '4'  # a string: int('4') would pass silently, int('four') raw ValueError
    json.dump(c, open(tmp_path / 'm' / 'config.json', 'w'))
    with pytest.raises(InputError, match=r"num_hidden_layers='4'; accepted: a non-negative int"):
        load_hf_folder(tmp_path / 'm')
