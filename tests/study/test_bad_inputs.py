"""The bad-input catalogue: every case runs launch/run_study.py in its own subprocess.

Contract checked for each case (exit status 2 is the launcher's "bad input" status):
  - exit status 2;
  - stderr's last line is one line 'run_study: ...' naming the bad value (asserted by substring)
    and saying what is accepted ('accepted' / 'expected' / 'supported' in the line), or for a
    NaN / inf the stage, condition, layer and step;
  - no 'Traceback' in stdout or stderr;
  - nothing half-written in the workdir: no results / report / timings, no temp files, every
    stage folder has its DONE marker; and a case that fails before its first stage (all but the
    data, NaN and full-disk cases) leaves no file at all (the workdir is not even created; a
    case that prepares its workdir finds it as it prepared it).

Besides the model, pruning, SAE, data and config values: config files that do not give a config,
workdirs that are the wrong place or hold something in the way, readers that are not installed,
hubs that cannot be reached, a disk that is full, a JAX platform the machine lacks.

The cases run two at a time in a thread pool (one subprocess each), so the module takes about
two minutes on two cores. The HF folders and GGUF files are built once per module from a tiny
model.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMOKE = 'configs/smoke.py'
# Enough characters for the smoke config's SAE rows (2048 tokens), calibration and perplexity.
_WORDS = (
    'the pruned model keeps most of its features while some rare ones are lost to '
    'magnitude and wanda alike; sparse autoencoders read the residual stream. '
)


@dataclasses.dataclass
class Case:
    name: str
    args: list  # flags after --config=configs/smoke.py (paths filled in by the fixture)
    needle: str  # must appear in the last stderr line
    early: bool = True  # fails before the first stage: no file may appear in the workdir
    config: str = SMOKE
    extra: tuple = ()  # further substrings of the last line
    prepare: Callable[[pathlib.Path], None] | None = None  # sets the workdir up before the run
    env: dict = dataclasses.field(default_factory=dict)  # environment variables for the run
    workdir_arg: str | None = None  # the --workdir value, when not the case's workdir path
    # further checks after the run: (workdir, completed process) -> problems
    verify: Callable[[pathlib.Path, subprocess.CompletedProcess], list] | None = None


# --------------------------------------------------------------------------- files to feed it


def _char_tokenizer(folder: pathlib.Path) -> None:
    """A character-level fast tokenizer (ids < 128, the tiny models' vocabulary) saved in folder."""
    from tokenizers import Tokenizer, models  # pylint: disable=import-outside-toplevel
    from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel

    vocab = {'<pad>': 0, '<bos>': 1, '<eos>': 2, '<unk>': 3}
    for c in map(chr, range(32, 127)):
        vocab[c] = len(vocab)
    vocab['\n'] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [], unk_token='<unk>'))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token='<bos>', eos_token='<eos>', pad_token='<pad>', unk_token='<unk>'
    )
    fast.save_pretrained(str(folder))


def _hf_folder(
    folder: pathlib.Path, family: str = 'llama', tokenizer: bool = False, nan_char: str | None = None, **overrides
) -> pathlib.Path:
    from prunesae_jax.models import init_params  # pylint: disable=import-outside-toplevel
    from prunesae_jax.models.convert import export_hf_folder  # pylint: disable=import-outside-toplevel
    from prunesae_jax.testing import tiny_config  # pylint: disable=import-outside-toplevel

    if nan_char is not None:
        overrides = {**overrides, 'rms_norm_eps': 0.0}
    cfg = tiny_config(family, **overrides)
    params = init_params(cfg, 0)
    if nan_char is not None:
        # One token's embedding row is zero and rms_norm_eps is 0: RMSNorm of that row is 0 / 0, so
        # the sequences holding it go NaN in the forward pass while every weight stays finite (the
        # loaders refuse NaN weights).
        token = 4 + ord(nan_char) - 32
        params = {**params, 'embed': params['embed'].at[token].set(0.0)}
    export_hf_folder(cfg, params, str(folder))
    if tokenizer:
        _char_tokenizer(folder)
    return folder


def _gguf_header(n_tensors: int = 1, n_kv: int = 1) -> bytes:
    key = b'general.architecture'
    value = b'llama'
    return (
        b'GGUF'
        + struct.pack('<IQQ', 3, n_tensors, n_kv)
        + struct.pack('<Q', len(key))
        + key
        + struct.pack('<I', 8)
        + struct.pack('<Q', len(value))
        + value
    )


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Bad (and nearly good) inputs, built once: name -> path."""
    d = tmp_path_factory.mktemp('bad_inputs')
    out = {}
    good = _hf_folder(d / 'good')
    weights = (good / 'model.safetensors').read_bytes()

    trunc = d / 'truncated'
    shutil.copytree(good, trunc)
    (trunc / 'model.safetensors').write_bytes(weights[: len(weights) // 2])
    out['truncated'] = trunc

    unknown = d / 'unknown_type'
    shutil.copytree(good, unknown)
    cfg = json.loads((good / 'config.json').read_text())
    (unknown / 'config.json').write_text(json.dumps({**cfg, 'model_type': 'mamba'}))
    out['unknown_type'] = unknown

    bad_json = d / 'bad_json'
    shutil.copytree(good, bad_json)
    (bad_json / 'config.json').write_text('{"model_type": "llama", ')
    out['bad_json'] = bad_json

    missing = d / 'missing_tensor'
    missing.mkdir()
    from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel

    sd = load_file(str(good / 'model.safetensors'))
    sd.pop('model.layers.1.mlp.down_proj.weight')
    save_file(sd, str(missing / 'model.safetensors'))
    shutil.copy(good / 'config.json', missing / 'config.json')
    out['missing_tensor'] = missing

    no_weights = d / 'no_weights'
    no_weights.mkdir()
    shutil.copy(good / 'config.json', no_weights / 'config.json')
    out['no_weights'] = no_weights

    out['odd_width'] = _hf_folder(d / 'odd_width', tokenizer=True, intermediate_size=129)
    out['nan'] = _hf_folder(d / 'nan', tokenizer=True, nan_char='~')

    magic = d / 'wrong_magic.gguf'
    magic.write_bytes(b'GGML' + b'\0' * 60)
    out['wrong_magic'] = magic
    header_only = d / 'header_only.gguf'
    header_only.write_bytes(_gguf_header()[:30])  # cut inside the first metadata key
    out['gguf_truncated'] = header_only
    empty_gguf = d / 'empty.gguf'
    empty_gguf.write_bytes(b'')
    out['gguf_empty'] = empty_gguf

    sae = d / 'saelens_d32'  # a SAELens folder for d_in=32; the tiny models have d_model=64
    sae.mkdir()
    rng = np.random.default_rng(0)
    save_file(
        {
            'W_enc': rng.normal(size=(32, 256)).astype(np.float32),
            'b_enc': np.zeros(256, np.float32),
            'W_dec': rng.normal(size=(256, 32)).astype(np.float32),
            'b_dec': np.zeros(32, np.float32),
        },
        str(sae / 'sae_weights.safetensors'),
    )
    (sae / 'cfg.json').write_text(json.dumps({'architecture': 'standard', 'd_in': 32, 'd_sae': 256}))
    out['sae_d32'] = sae

    empty_txt = d / 'empty.txt'
    empty_txt.write_text('')
    out['empty_txt'] = empty_txt
    blank = d / 'blank.jsonl'  # documents whose text is empty: zero tokens, found while reading
    blank.write_text('{"text": ""}\n' * 3)
    out['blank_jsonl'] = blank
    clean = d / 'clean.txt'
    clean.write_text(_WORDS * 40)
    out['clean_txt'] = clean
    tilde = d / 'tilde.txt'  # '~' is the token whose embedding is NaN in the 'nan' model
    tilde.write_text(_WORDS * 5 + '~' + _WORDS * 30)
    out['tilde_txt'] = tilde
    bad_data = d / 'corpus.csv'
    bad_data.write_text('text\nhello\n')
    out['csv'] = bad_data

    bad_config = d / 'broken_config.py'
    bad_config.write_text('def get_config(:\n')
    out['broken_config'] = bad_config

    out['no_tokenizer'] = good  # weights and config.json, no tokenizer files
    latin1 = d / 'latin1.txt'  # 'café' in Latin-1: byte 0xe9 is no UTF-8
    latin1.write_bytes(('the pruned model ' * 40 + 'caf\xe9 ' + _WORDS * 40).encode('latin-1'))
    out['latin1_txt'] = latin1
    late = d / 'late_latin1.txt'  # UTF-8 for its first 1.2 MB (what validate reads), then Latin-1
    late.write_bytes(('x' * 99 + '\n').encode() * 12_000 + 'caf\xe9\n'.encode('latin-1'))
    out['late_latin1_txt'] = late
    parquet = d / 'corpus.parquet'  # never read: pyarrow is not installed (checked by the case)
    parquet.write_bytes(b'PAR1')
    out['parquet'] = parquet
    smoke = ROOT / SMOKE
    configs = {
        'raises': 'def get_config():\n    raise RuntimeError("no config today")\n',
        'raises_value': 'def get_config():\n    raise ValueError("bad sweep value 7")\n',
        'returns_none': 'def get_config():\n    config = 1\n',
        'returns_dict': 'def get_config():\n    return {"model": "tiny:llama"}\n',
        'no_get_config': 'CONFIG = {"model": "tiny:llama"}\n',
        'imports_missing': 'import no_such_module_xyz\n\n\ndef get_config():\n    return None\n',
    }
    for name, text in configs.items():
        (d / f'{name}.py').write_text(text)
        out[f'config_{name}'] = d / f'{name}.py'
    # The smoke config in a process whose writes of <suffix> files under <workdir>/stages find the
    # disk full (ENOSPC), as on a full file system.
    # Every file is written through a temp file named .<name>.<random>.tmp (prunesae_jax/io.py).
    for name, suffix in (('full_disk_stage', '.tmp'), ('full_disk_shard', '.shard_')):
        (d / f'{name}.py').write_text(_FULL_DISK.format(smoke=str(smoke), suffix=suffix))
        out[name] = d / f'{name}.py'
    return out


# The end of every config file written below: get_config() returns configs/smoke.py's config.
_LOAD_SMOKE = """
def get_config():
    spec = importlib.util.spec_from_file_location('smoke_config', {smoke!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
"""


_FULL_DISK = (
    '''"""configs/smoke.py, where writing a file under .../work/stages/ whose name holds {suffix!r} fails
with ENOSPC (what a full disk does)."""
import errno
import importlib.util
import os

_fdopen = os.fdopen


class _Full:
    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _fdopen_full(fd, *args, **kwargs):
    f = _fdopen(fd, *args, **kwargs)
    mode = args[0] if args else kwargs.get('mode', 'r')
    try:
        path = os.readlink(f'/proc/self/fd/{{fd}}')
    except OSError:
        return f
    if 'w' in mode and '/work/stages/' in path and {suffix!r} in os.path.basename(path):
        return _Full(f)
    return f


os.fdopen = _fdopen_full

'''
    + _LOAD_SMOKE
)


def _stale_results(workdir: pathlib.Path) -> None:
    """The workdir of a finished run of another config."""
    workdir.mkdir()
    (workdir / 'config.json').write_text('{"name": "an older config"}\n')
    (workdir / 'results.json').write_text('{"name": "an older config"}\n')
    (workdir / 'report.md').write_text('# the older results\n')
    (workdir / 'tables').mkdir()
    (workdir / 'tables' / 'ppl.csv').write_text('old\n')


def _stale_results_gone(workdir: pathlib.Path, out) -> list:
    del out
    problems = [
        f'{n} of the older config left beside the new config.json'
        for n in ('results.json', 'report.md', 'tables')
        if (workdir / n).exists()
    ]
    config = json.loads((workdir / 'config.json').read_text())
    if config.get('name') != 'smoke: tiny random model':
        problems.append(f'config.json is not the config of the new run: {config}')
    return problems


def _make(*parts: str, files: dict | None = None) -> Callable[[pathlib.Path], None]:
    """prepare: the workdir with the given folders (names ending in '/') and files."""

    def prepare(workdir: pathlib.Path) -> None:
        workdir.mkdir()
        for part in parts:
            p = workdir / part.rstrip('/')
            p.parent.mkdir(parents=True, exist_ok=True)
            if part.endswith('/'):
                p.mkdir()
            else:
                p.write_text((files or {}).get(part, ''))

    return prepare


def _dangling(workdir: pathlib.Path) -> None:
    workdir.symlink_to(workdir.parent / 'gone' / 'deeper')


def _cwd_untouched(workdir: pathlib.Path, out) -> list:
    """The empty --workdir runs in workdir.parent: nothing may appear there."""
    del out
    left = sorted(p.name for p in workdir.parent.iterdir())
    return [f'files written into the current directory: {left}'] if left else []


def _cases(f) -> list[Case]:
    def data(which, path, split='all'):
        return [f'--config.data.{which}.source={path}', f'--config.data.{which}.split={split}']

    own_data = data('train', f['tilde_txt']) + data('calibration', f['clean_txt']) + data('eval', f['clean_txt'])
    return [
        # model stage
        Case(
            'truncated_safetensors',
            [f'--config.model={f["truncated"]}'],
            'model.safetensors',
            extra=('truncated/model.safetensors', 'corrupt'),
        ),
        Case('gguf_wrong_magic', [f'--config.model={f["wrong_magic"]}'], "b'GGML'"),
        Case(
            'gguf_truncated_header', [f'--config.model={f["gguf_truncated"]}'], 'header_only.gguf', extra=('truncated',)
        ),
        Case('gguf_empty_file', [f'--config.model={f["gguf_empty"]}'], 'empty.gguf'),
        Case('unknown_model_type', [f'--config.model={f["unknown_type"]}'], "'mamba'"),
        Case('config_json_not_json', [f'--config.model={f["bad_json"]}'], 'config.json', extra=('not valid JSON',)),
        Case(
            'safetensors_missing_tensor',
            [f'--config.model={f["missing_tensor"]}'],
            'model.layers.1.mlp.down_proj.weight',
        ),
        Case('folder_without_weights', [f'--config.model={f["no_weights"]}'], 'no *.safetensors'),
        Case('unknown_model_name', ['--config.model=gpt-9000'], "'gpt-9000'"),
        Case('nonexistent_model_path', ['--config.model=/nonexistent/model'], '/nonexistent/model'),
        Case('unknown_tiny_family', ['--config.model=tiny:mamba'], "'tiny:mamba'"),
        Case('layer_out_of_range', ['--config.layer=7'], 'config.layer=7', extra=('[0, 3]',)),
        Case('bad_dtype', ['--config.dtype=float8'], "'float8'"),
        # pruning stage
        Case('sparsity_one', ['--config.pruning.sparsities=(0.0, 1.0)'], '1.0', extra=('[0, 1)',)),
        Case('sparsity_negative', ['--config.pruning.sparsities=(-0.1, 0.5)'], '-0.1', extra=('[0, 1)',)),
        Case(
            'nm_on_odd_width',
            [
                f'--config.model={f["odd_width"]}',
                '--config.pruning.group.wanda=2:4',
                '--config.pruning.sparsities=(0.0, 0.5)',
            ],
            "'2:4'",
            extra=('intermediate_size=129',),
        ),
        Case('nm_not_a_pattern', ['--config.pruning.group.wanda=4:2'], "'4:2'"),
        Case('unknown_pruning_method', ["--config.pruning.methods=('obs',)"], "'obs'"),
        Case('calibration_seq_len_one', ['--config.calibration.seq_len=1'], 'config.calibration.seq_len=1'),
        # SAE stage
        Case('k_zero', ['--config.sae.k=0'], 'config.sae.k=0'),
        Case('k_above_latents', ['--config.sae.k=100000'], 'config.sae.k=100000', extra=('at most',)),
        Case('unknown_sae_architecture', ['--config.sae.architecture=gated'], "'gated'"),
        Case('n_seeds_zero', ['--config.sae.n_seeds=0'], 'config.sae.n_seeds=0'),
        Case('negative_lr', ['--config.sae.lr=-0.001'], 'config.sae.lr=-0.001'),
        Case('sae_seq_len_zero', ['--config.sae.seq_len=0'], 'config.sae.seq_len=0'),
        Case(
            'saelens_d_in_mismatch',
            ['--config.transfer.source=pretrained', f'--config.transfer.path={f["sae_d32"]}'],
            'd_in=32',
            extra=('d_model=64',),
        ),
        Case(
            'transfer_path_missing',
            ['--config.transfer.source=pretrained', '--config.transfer.path=/nonexistent/sae'],
            '/nonexistent/sae',
        ),
        Case('tau_above_one', ['--config.analysis.tau=1.5'], 'config.analysis.tau=1.5'),
        Case('tau_zero', ['--config.analysis.tau=0.0'], 'config.analysis.tau=0.0'),
        # data stage
        Case('empty_text_file', data('train', f['empty_txt']), 'empty.txt', extra=('zero tokens',)),
        Case(
            'zero_token_documents', data('train', f['blank_jsonl']), 'blank.jsonl', extra=('zero tokens',), early=False
        ),
        Case('data_file_wrong_suffix', data('train', f['csv']), 'corpus.csv'),
        Case('data_missing_file', data('train', '/nonexistent/corpus.txt'), '/nonexistent/corpus.txt'),
        # config stage
        Case('override_wrong_type', ['--config.sae.k=abc'], "'abc'", extra=('type int',)),
        Case('unknown_field', ['--config.no_such_field=1'], 'no_such_field'),
        Case('nonexistent_config_file', [], 'missing.py', config='configs/missing.py'),
        Case('config_file_syntax_error', [], 'broken_config.py', config=str(f['broken_config'])),
        # non-finite: NaN activations stop the capture of the dense condition, batch by batch
        Case(
            'nan_activations',
            [f'--config.model={f["nan"]}', *own_data],
            'resid_post',
            extra=('stage=capture', 'condition=dense', 'layer=1', 'step='),
            early=False,
        ),
        # ---- ordinary mistakes that used to end in a traceback
        # config files that give no config
        Case(
            'config_get_config_raises',
            [],
            'raises.py',
            config=str(f['config_raises']),
            extra=('get_config() raised RuntimeError', 'no config today'),
        ),
        Case(
            'config_get_config_raises_value_error',
            [],
            'raises_value.py',
            config=str(f['config_raises_value']),
            extra=('ValueError', 'bad sweep value 7'),
        ),
        Case(
            'config_get_config_returns_none',
            [],
            'returns_none.py',
            config=str(f['config_returns_none']),
            extra=('returned NoneType',),
        ),
        Case(
            'config_get_config_returns_dict',
            [],
            'returns_dict.py',
            config=str(f['config_returns_dict']),
            extra=('returned dict',),
        ),
        Case(
            'config_without_get_config',
            [],
            'no_get_config.py has no get_config()',
            config=str(f['config_no_get_config']),
        ),
        Case(
            'config_imports_a_missing_module',
            [],
            'imports_missing.py',
            config=str(f['config_imports_missing']),
            extra=("No module named 'no_such_module_xyz'",),
        ),
        # corpora
        Case('corpus_not_utf8', data('train', f['latin1_txt']), 'latin1.txt', extra=('not UTF-8', "b'\\xe9'")),
        Case(
            'corpus_not_utf8_past_the_first_mib',
            data('train', f['late_latin1_txt']),
            'config.data.train.source',
            extra=('late_latin1.txt', 'not UTF-8'),
            early=False,
        ),
        Case('parquet_without_pyarrow', data('train', f['parquet']), 'corpus.parquet', extra=('pyarrow',)),
        # models and dictionaries
        Case(
            'hf_folder_without_tokenizer',
            [f'--config.model={f["no_tokenizer"]}'],
            'has no tokenizer',
            extra=(str(f['no_tokenizer']),),
        ),
        Case(
            'transfer_repo_offline',
            [
                '--config.transfer.source=pretrained',
                '--config.transfer.repo=no-such-org/no-such-saes',
                '--config.transfer.path=layer_1',
            ],
            "config.transfer.repo='no-such-org/no-such-saes'",
            env={'HF_HUB_OFFLINE': '1'},
        ),
        Case('jax_platform_not_here', [], "JAX_PLATFORMS='tpu'", env={'JAX_PLATFORMS': 'tpu'}),
        # workdirs: the wrong place, or something in the way
        Case('workdir_empty_string', [], "--workdir=''", workdir_arg='', verify=_cwd_untouched),
        Case('workdir_not_a_study', [], 'notes.txt', prepare=_make('notes.txt', 'photos/'), extra=('no study',)),
        Case('workdir_dangling_symlink', [], 'symlink to nothing', prepare=_dangling, extra=('gone/deeper',)),
        Case(
            'workdir_stages_is_a_file',
            [],
            "'stages'",
            prepare=_make('config.json', 'stages'),
            extra=('is a folder or absent',),
        ),
        Case('workdir_stage_is_a_file', [], "'stages/tokens'", prepare=_make('config.json', 'stages/tokens')),
        Case('workdir_lock_is_a_folder', [], "'.lock'", prepare=_make('.lock/'), extra=('is a file or absent',)),
        Case('workdir_tables_is_a_file', [], "'tables'", prepare=_make('config.json', 'tables')),
        # the disk fills up: a stage file, an activation shard (written by the store)
        Case(
            'disk_full_stage_file',
            [],
            'no space left',
            config=str(f['full_disk_stage']),
            extra=('tokens.npz',),
            early=False,
        ),
        Case('disk_full_activation_shard', [], 'no space left', config=str(f['full_disk_shard']), early=False),
        # ---- validated before the first expensive step, naming the config field
        Case(
            'n_quintiles_above_latents',
            ['--config.analysis.n_quintiles=1000'],
            'config.analysis.n_quintiles=1000',
            extra=('512',),
        ),
        # ---- an SAE train state no machine holds (2 seeds x 64 x 320M latents: ~920 GiB), refused early
        Case(
            'sae_state_too_big',
            ['--config.sae.expansion=5000000'],
            'n_seeds=2 SAEs of 320000000 latents x d_in=64 need',
            extra=('GiB available; accepted',),
        ),
        # ---- results and config stay consistent: a changed config that fails removes the old results
        Case(
            'changed_config_fails_after_stale_results',
            data('train', f['blank_jsonl']),
            'blank.jsonl',
            extra=('zero tokens',),
            early=False,
            prepare=_stale_results,
            verify=_stale_results_gone,
        ),
    ]


# --------------------------------------------------------------------------- running them


def _files_under(path: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob('*') if not p.is_dir())


def _run_case(case: Case, workdir: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3', **case.env}
    config = case.config if os.path.isabs(case.config) else str(ROOT / case.config)
    arg = str(workdir) if case.workdir_arg is None else case.workdir_arg
    # Run in the case's own folder: a relative (or empty) --workdir must not land in the repo.
    cmd = [sys.executable, str(ROOT / 'launch' / 'run_study.py'), f'--config={config}', *case.args, f'--workdir={arg}']
    return subprocess.run(cmd, cwd=workdir.parent, capture_output=True, text=True, timeout=240, env=env)


def _check(case: Case, out: subprocess.CompletedProcess, workdir: pathlib.Path, before: tuple = ()) -> list[str]:
    """The contract's violations for one case (empty when it holds); `before`: the workdir's files
    as the case prepared them."""
    problems = []
    if out.returncode != 2:
        problems.append(f'exit status {out.returncode}, expected 2')
    if 'Traceback' in out.stderr or 'Traceback' in out.stdout:
        problems.append('a traceback was printed')
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else ''
    if not last.startswith('run_study: '):
        problems.append(f'last stderr line is not "run_study: ...": {last!r}')
    for needle in (case.needle, *case.extra):
        if needle not in last:
            problems.append(f'{needle!r} not in the last line {last!r}')
    # a NaN / inf line names stage, condition, layer and step instead (the case's extra needles)
    if 'non-finite' not in last and not any(w in last for w in ('accepted', 'expected', 'supported')):
        problems.append(f'the last line does not say what is accepted: {last!r}')
    if case.verify is not None:
        problems += case.verify(workdir, out)
    if workdir.exists():
        left = _files_under(workdir)
        if case.early and left != list(before):
            problems.append(f'files left in the workdir by an up-front failure: {left} (was {list(before)})')
        for name in left:
            if name in ('results.json', 'timings.json', 'report.md') or 'tmp' in name:
                problems.append(f'partial output {name!r} left in the workdir')
        stages = workdir / 'stages'
        if stages.is_dir():
            for stage_dir in stages.iterdir():
                for keyed in stage_dir.iterdir() if stage_dir.is_dir() else ():
                    if keyed.is_dir() and not (keyed / 'DONE').exists():
                        problems.append(f'stage folder {keyed.relative_to(workdir)} has no DONE')
    return problems


def test_catalogue_has_every_stage(files):
    cases = _cases(files)
    assert len(cases) >= 61
    assert len({c.name for c in cases}) == len(cases)


def test_bad_inputs_exit_2_with_one_line_and_leave_nothing_half_written(files, tmp_path):
    cases = _cases(files)
    workdirs = {c.name: tmp_path / c.name / 'work' for c in cases}
    before = {}
    for c in cases:
        workdirs[c.name].parent.mkdir()
        if c.prepare is not None:
            c.prepare(workdirs[c.name])
        before[c.name] = tuple(_files_under(workdirs[c.name])) if workdirs[c.name].is_dir() else ()
    # Two subprocesses at a time: the machine has two cores; each case is its own process.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        runs = {c.name: pool.submit(_run_case, c, workdirs[c.name]) for c in cases}
        results = {name: fut.result() for name, fut in runs.items()}
    failures = {}
    for c in cases:
        problems = _check(c, results[c.name], workdirs[c.name], before[c.name])
        if problems:
            failures[c.name] = problems + [f'stderr tail: {results[c.name].stderr[-600:]!r}']
    assert not failures, json.dumps(failures, indent=1)

    # The NaN run stopped in capture; the tokens and perplexity stages before it stay cached.
    stages = workdirs['nan_activations'] / 'stages'
    done = sorted(p.parent.parent.name for p in stages.glob('*/*/DONE'))
    assert done == ['ppl', 'tokens'], done
    assert not list(stages.glob('acts/*'))  # the capture's temp folder was removed
    ppl = json.loads(next(stages.glob('ppl/*/ppl.json')).read_text())
    assert np.isfinite(ppl['ppl']) and ppl['ppl'] > 1.0


def _unwritable_folder(tmp_path: pathlib.Path) -> pathlib.Path:
    """A folder this process cannot create files in: mode 0o500 for a normal user; for root, who
    ignores mode bits, the root of sysfs (mkdir there fails with EPERM)."""
    if os.geteuid() != 0:
        locked = tmp_path / 'locked'
        locked.mkdir()
        os.chmod(locked, 0o500)
        return locked
    sysfs = pathlib.Path('/sys')
    try:
        (sysfs / 'prunesae_jax_probe').mkdir()
    except OSError:
        return sysfs
    (sysfs / 'prunesae_jax_probe').rmdir()
    pytest.skip('running as root and /sys is writable here: no unwritable folder to test with')


def test_unwritable_workdir(tmp_path):
    locked = _unwritable_folder(tmp_path)
    try:
        case = Case('unwritable_workdir', [], str(locked), extra=('not writable',))
        workdir = locked / 'prunesae_jax_work'
        out = _run_case(case, workdir)
        assert not _check(case, out, workdir), out.stderr[-2000:]
        assert not workdir.exists()
    finally:
        if locked != pathlib.Path('/sys'):
            os.chmod(locked, 0o700)


def test_workdir_that_is_a_file(tmp_path):
    target = tmp_path / 'a_file'
    target.write_text('not a folder')
    case = Case('workdir_is_a_file', [], 'a_file', extra=('is a file',))
    out = _run_case(case, target)
    assert out.returncode == 2 and 'Traceback' not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith('run_study: ') and 'a_file' in last and 'accepted' in last
    assert target.read_text() == 'not a folder'


_BUGGY_CONFIG = (
    '''"""configs/smoke.py in a process whose tokens stage has a bug (raises RuntimeError)."""
import importlib.util

from prunesae_jax import data


def _buggy_take_tokens(*args, **kwargs):
    raise RuntimeError('a bug in the tokens stage')


data.take_tokens = _buggy_take_tokens

'''
    + _LOAD_SMOKE
)


def test_an_unexpected_error_is_one_line_and_a_log_in_the_workdir(tmp_path):
    """Not known to be bad input: exit status 1, one line naming the error, the stage and the log
    that holds its traceback (the next run that finishes removes the log)."""
    config = tmp_path / 'buggy.py'
    config.write_text(_BUGGY_CONFIG.format(smoke=str(ROOT / SMOKE)))
    workdir = tmp_path / 'work'
    out = _run_case(Case('bug', [], '', config=str(config)), workdir)
    assert out.returncode == 1, out.stderr[-2000:]
    assert 'Traceback' not in out.stderr and 'Traceback' not in out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    log = workdir / 'run_study.error.log'
    assert lines[-1].startswith('run_study: unexpected RuntimeError during tokens: a bug in the tokens stage;'), lines[
        -1
    ]
    assert str(log) in lines[-1] and sum(ln.startswith('run_study: ') for ln in lines) == 1
    text = log.read_text()
    assert 'Traceback (most recent call last)' in text and '_buggy_take_tokens' in text
    assert not (workdir / 'results.json').exists()
