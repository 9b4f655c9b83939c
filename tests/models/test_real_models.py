"""Real-model parity: Gemma 3 270M and SmolLM2-135M from their PyPI GGUFs, ours vs transformers.

Both sides read the same GGUF file: ours through the zoo (converted once, cached under
$PRUNESAE_CACHE), transformers through `from_pretrained(dir, gguf_file=...)`. Over a fixed set of
prompts: max |logit diff| <= 1e-3 in fp32, identical 16-token greedy continuations, and resid_post
equal to HF hidden_states[l + 1] at every layer (the last one taken before the final norm, by a
hook). One prompt is longer than Gemma's 512-token window. transformers' result is cached as an
HF folder next to the zoo cache (it takes 30-100 s to dequantise Gemma), see _transformers_reference.
Run `pytest -s -m slow tests/models/test_real_models.py` to see the measured differences.
"""

import os
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PROMPTS = (
    'The capital of France is',
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    'Photosynthesis converts light energy into',
    'Q: What is 17 multiplied by 23?\nA:',
    'Die Katze sitzt auf der Matte und',
    'Once upon a time, in a small village by the sea, there lived',
    '{"name": "Ada Lovelace", "born": 1815, "known_for": [',
    'The three primary colors are red,',
    'import numpy as np\nx = np.linspace(0, 1, 11)\nprint(x.',
    'In 1969, Neil Armstrong became the first person to',
)
GEN_PROMPTS = PROMPTS[:8]  # greedy decoding reruns the whole buffer per token: the costly part
N_NEW = 16
LOGIT_TOL = 1e-3
RESID_TOL = 1e-4  # relative to the largest |activation| of that layer


def _long_prompt():
    words = (
        'river mountain forest city ocean desert island valley bridge tower garden market library harbor castle meadow'
    ).split()
    rng = np.random.RandomState(0)
    return ' '.join(rng.choice(words) for _ in range(700)) + '. In summary, the journey'


def _report(msg):
    print(msg, flush=True)
    return msg


def _transformers_reference(name):
    """transformers' model of the zoo GGUF (from_pretrained(dir, gguf_file=...)), cached as its own HF folder.

    transformers dequantises Gemma's GGUF in 30-100 s; its result (state dict + config, nothing of
    ours) is saved once per transformers version next to the zoo cache and reloaded in seconds.
    """
    import json
    import shutil
    import tempfile

    import torch
    import transformers
    from safetensors.torch import save_file

    from prunesae_jax.models import zoo

    folder = os.path.join(zoo.cache_dir(name), f'transformers-{transformers.__version__}-reference')
    if not os.path.isfile(os.path.join(folder, 'config.json')):
        path = zoo.gguf_path(name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        )
        sd = {
            k: v.contiguous()
            for k, v in hf.state_dict().items()
            if not (k == 'lm_head.weight' and hf.config.tie_word_embeddings)
        }
        config = hf.config.to_dict()
        config.pop('quantization_config', None)
        tmp = tempfile.mkdtemp(dir=zoo.cache_dir(name), prefix='.reference.', suffix='.tmp')
        try:
            save_file(sd, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
            with open(os.path.join(tmp, 'config.json'), 'w') as f:
                json.dump(config, f, default=str)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope='module', params=['gemma-3-270m', 'smollm2-135m'])
def pair(request):
    """(name, cfg, params, tokenizer, hf_model) with both sides loaded from the same GGUF, once per module."""
    import torch

    from prunesae_jax.models import zoo

    # torch's OpenMP workers spin while JAX's threads hold the cores: one thread is ~10x faster here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    name = request.param
    t0 = time.time()
    cfg, params, tokenizer = zoo.load_zoo(name)
    t1 = time.time()
    hf = _transformers_reference(name).eval()
    _report(f'\n[{name}] load_zoo {t1 - t0:.1f} s, transformers reference load {time.time() - t1:.1f} s')
    yield name, cfg, params, tokenizer, hf
    torch.set_num_threads(threads)


def _batch(tokenizer, prompts, pad):
    ids = [tokenizer(p).input_ids for p in prompts]
    T = max(map(len, ids))
    tokens = np.full((len(ids), T), pad, np.int32)  # right padding: causal attention keeps it invisible
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = x
    return tokens, [len(x) for x in ids]


def _hf_run(hf, tokens):
    """transformers' logits [B,T,V] and the output of every decoder layer [B,T,D] (hooks: HF's last
    hidden_states entry is after the final norm, resid_post's last layer is before it)."""
    import torch

    outputs = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
        for layer in hf.model.layers
    ]
    try:
        with torch.no_grad():
            out = hf(torch.tensor(tokens, dtype=torch.long), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    layers = [o.float().numpy() for o in outputs]
    for l in range(len(layers) - 1):  # the hooks see what output_hidden_states reports
        np.testing.assert_array_equal(layers[l], out.hidden_states[l + 1].numpy())
    return out.logits.float().numpy(), layers


def _compare(name, cfg, params, hf, tokens, lengths, what):
    from prunesae_jax.models import forward, resid_post

    logits = np.asarray(forward(cfg, params, tokens))
    resid = {l: np.asarray(v) for l, v in resid_post(cfg, params, tokens).items()}
    hf_logits, hf_layers = _hf_run(hf, tokens)
    valid = np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]  # [B, T]
    logit_err = float(np.abs(logits - hf_logits)[valid].max())
    resid_err = 0.0
    for l in range(cfg.num_layers):
        a, b = resid[l][valid], hf_layers[l][valid]
        resid_err = max(resid_err, float(np.abs(a - b).max() / np.abs(b).max()))
    _report(
        f'[{name}] {what}: {valid.sum()} positions, max |logit diff| = {logit_err:.2e}, '
        f'max relative resid_post diff over {cfg.num_layers} layers = {resid_err:.2e}'
    )
    assert logit_err <= LOGIT_TOL, f'{name} {what}: max |logit diff| = {logit_err:.3e} > {LOGIT_TOL}'
    assert resid_err <= RESID_TOL, f'{name} {what}: relative resid_post diff = {resid_err:.3e} > {RESID_TOL}'


def test_logits_and_resid_post_match_transformers(pair):
    name, cfg, params, tokenizer, hf = pair
    t0 = time.time()
    tokens, lengths = _batch(tokenizer, PROMPTS, cfg.pad_token_id or 0)
    _compare(name, cfg, params, hf, tokens, lengths, f'{len(PROMPTS)} prompts')
    _report(f'[{name}] short prompts compared in {time.time() - t0:.1f} s')


def test_long_prompt_past_the_sliding_window(pair):
    name, cfg, params, tokenizer, hf = pair
    t0 = time.time()
    tokens, lengths = _batch(tokenizer, [_long_prompt()], 0)
    assert tokens.shape[1] > 600, tokens.shape  # Gemma 3's window is 512
    _compare(name, cfg, params, hf, tokens, lengths, f'one {tokens.shape[1]}-token prompt')
    _report(f'[{name}] long prompt compared in {time.time() - t0:.1f} s')


def test_greedy_continuations_match_transformers_generate(pair):
    import torch

    from prunesae_jax.models.generate import greedy_generate

    name, cfg, params, tokenizer, hf = pair
    t0 = time.time()
    hf.generation_config.eos_token_id = None  # always N_NEW tokens, as greedy_generate
    mismatches, examples = [], []
    for prompt in GEN_PROMPTS:
        ids = np.asarray([tokenizer(prompt).input_ids], np.int32)
        ours = np.asarray(greedy_generate(cfg, params, ids, N_NEW))[0, ids.shape[1] :]
        with torch.no_grad():
            theirs = hf.generate(
                torch.tensor(ids, dtype=torch.long),
                max_new_tokens=N_NEW,
                do_sample=False,
                pad_token_id=cfg.pad_token_id,
            ).numpy()[0, ids.shape[1] :]
        assert len(ours) == len(theirs) == N_NEW
        examples.append(f'{prompt!r} -> {tokenizer.decode(ours)!r}')
        if not np.array_equal(ours, theirs):
            mismatches.append((prompt, tokenizer.decode(ours), tokenizer.decode(theirs)))
    _report(
        f'[{name}] greedy {N_NEW} tokens x {len(GEN_PROMPTS)} prompts: {len(GEN_PROMPTS) - len(mismatches)} '
        f'identical ({time.time() - t0:.1f} s); e.g. {examples[0]}'
    )
    assert not mismatches, f'{name}: greedy continuations differ from transformers: {mismatches}'


TOKENIZER_TEXTS = [
    'The capital of France is',
    '  leading spaces\tand tabs\n\nnew paragraphs',
    'def f(x):\n    return x**2  # café ñ 日本語 🙂',
    "Hello, world! It's 3.14159.",
]


@pytest.mark.parametrize('name', ['smollm2-135m', 'gemma-3-270m'])
def test_torch_free_tokenizer_encodes_like_transformers_gguf_path(name):
    """The zoo builds its tokenizer without torch; it must encode exactly as AutoTokenizer(gguf_file=...)."""
    from transformers import AutoTokenizer

    from prunesae_jax.models import zoo

    path = zoo.gguf_path(name)
    ours = zoo._build_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in TOKENIZER_TEXTS:
        assert ours(text).input_ids == ref(text).input_ids, text
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        ref.bos_token_id,
        ref.eos_token_id,
        ref.pad_token_id,
    )
