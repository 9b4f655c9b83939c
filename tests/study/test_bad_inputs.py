"""The bad-input catalogue: every case runs launch/run_study.py in its own subprocess.

Contract checked for each case (exit status 2 is the launcher's "bad input" status):
  - exit status 2;
  - stderr's last line is one line 'run_study: ...' naming the bad value (asserted by substring)
    and saying what is accepted ('accepted' / 'expected' / 'supported' in the line), or for a
    NaN / inf the stage, condition, layer and step;
  - no 'Traceback' in stdout or stderr;
  - nothing half-written in the workdir: no results / report / timings, no temp files, every
    stage folder has its DONE marker; and a case that fails before its first stage (all but the
    data and NaN cases) leaves no file at all (the workdir is not even created).

The cases run two at a time in a thread pool (one subprocess each), so the module takes about a
minute on two cores. The HF folders and GGUF files are built once per module from a tiny model.
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

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMOKE = 'configs/smoke.py'
# Enough characters for the smoke config's SAE rows (2048 tokens), calibration and perplexity.
_WORDS = ('the pruned model keeps most of its features while some rare ones are lost to '
          'magnitude and wanda alike; sparse autoencoders read the residual stream. ')


@dataclasses.dataclass
class Case:
    name: str
    args: list  # flags after --config=configs/smoke.py (paths filled in by the fixture)
    needle: str  # must appear in the last stderr line
    early: bool = True  # fails before the first stage: no file may appear in the workdir
    config: str = SMOKE
    extra: tuple = ()  # further substrings of the last line


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
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<bos>', eos_token='<eos>',
                                   pad_token='<pad>', unk_token='<unk>')
    fast.save_pretrained(str(folder))


def _hf_folder(folder: pathlib.Path, family: str = 'llama', tokenizer: bool = False,
               nan_char: str | None = None, **overrides) -> pathlib.Path:
    from prunesae_jax.models import init_params  # pylint: disable=import-outside-toplevel
    from prunesae_jax.models.convert import export_hf_folder  # pylint: disable=import-outside-toplevel
    from prunesae_jax.testing import tiny_config  # pylint: disable=import-outside-toplevel
    cfg = tiny_config(family, **overrides)
    params = init_params(cfg, 0)
    if nan_char is not None:  # one token's embedding row is NaN: only rows holding it go NaN
        token = 4 + ord(nan_char) - 32
        params = {**params, 'embed': params['embed'].at[token].set(np.nan)}
    export_hf_folder(cfg, params, str(folder))
    if tokenizer:
        _char_tokenizer(folder)
    return folder


def _gguf_header(n_tensors: int = 1, n_kv: int = 1) -> bytes:
    key = b'general.architecture'
    value = b'llama'
    return (b'GGUF' + struct.pack('<IQQ', 3, n_tensors, n_kv) + struct.pack('<Q', len(key)) + key
            + struct.pack('<I', 8) + struct.pack('<Q', len(value)) + value)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Bad (and nearly good) inputs, built once: name -> path."""
    d = tmp_path_factory.mktemp('bad_inputs')
    out = {}
    good = _hf_folder(d / 'good')
    weights = (good / 'model.safetensors').read_bytes()

    trunc = d / 'truncated'
    shutil.copytree(good, trunc)
    (trunc / 'model.safetensors').write_bytes(weights[:len(weights) // 2])
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
    save_file({'W_enc': rng.normal(size=(32, 256)).astype(np.float32),
               'b_enc': np.zeros(256, np.float32),
               'W_dec': rng.normal(size=(256, 32)).astype(np.float32),
               'b_dec': np.zeros(32, np.float32)}, str(sae / 'sae_weights.safetensors'))
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
    return out


def _cases(f) -> list[Case]:
    def data(which, path, split='all'):
        return [f'--config.data.{which}.source={path}', f'--config.data.{which}.split={split}']

    own_data = (data('train', f['tilde_txt']) + data('calibration', f['clean_txt'])
                + data('eval', f['clean_txt']))
    return [
        # model stage
        Case('truncated_safetensors', [f'--config.model={f["truncated"]}'], 'model.safetensors',
             extra=('truncated/model.safetensors', 'corrupt')),
        Case('gguf_wrong_magic', [f'--config.model={f["wrong_magic"]}'], "b'GGML'"),
        Case('gguf_truncated_header', [f'--config.model={f["gguf_truncated"]}'],
             'header_only.gguf', extra=('truncated',)),
        Case('gguf_empty_file', [f'--config.model={f["gguf_empty"]}'], 'empty.gguf'),
        Case('unknown_model_type', [f'--config.model={f["unknown_type"]}'], "'mamba'"),
        Case('config_json_not_json', [f'--config.model={f["bad_json"]}'], 'config.json',
             extra=('not valid JSON',)),
        Case('safetensors_missing_tensor', [f'--config.model={f["missing_tensor"]}'],
             'model.layers.1.mlp.down_proj.weight'),
        Case('folder_without_weights', [f'--config.model={f["no_weights"]}'], 'no *.safetensors'),
        Case('unknown_model_name', ['--config.model=gpt-9000'], "'gpt-9000'"),
        Case('nonexistent_model_path', ['--config.model=/nonexistent/model'], '/nonexistent/model'),
        Case('unknown_tiny_family', ['--config.model=tiny:mamba'], "'tiny:mamba'"),
        Case('layer_out_of_range', ['--config.layer=7'], 'config.layer=7', extra=('[0, 3]',)),
        Case('bad_dtype', ['--config.dtype=float8'], "'float8'"),
        # pruning stage
        Case('sparsity_one', ['--config.pruning.sparsities=(0.0, 1.0)'], '1.0', extra=('[0, 1)',)),
        Case('sparsity_negative', ['--config.pruning.sparsities=(-0.1, 0.5)'], '-0.1',
             extra=('[0, 1)',)),
        Case('nm_on_odd_width', [f'--config.model={f["odd_width"]}',
                                 '--config.pruning.group.wanda=2:4',
                                 '--config.pruning.sparsities=(0.0, 0.5)'],
             "'2:4'", extra=('intermediate_size=129',)),
        Case('nm_not_a_pattern', ['--config.pruning.group.wanda=4:2'], "'4:2'"),
        Case('unknown_pruning_method', ["--config.pruning.methods=('obs',)"], "'obs'"),
        Case('calibration_seq_len_one', ['--config.calibration.seq_len=1'],
             'config.calibration.seq_len=1'),
        # SAE stage
        Case('k_zero', ['--config.sae.k=0'], 'config.sae.k=0'),
        Case('k_above_latents', ['--config.sae.k=100000'], 'config.sae.k=100000',
             extra=('at most',)),
        Case('unknown_sae_architecture', ['--config.sae.architecture=gated'], "'gated'"),
        Case('n_seeds_zero', ['--config.sae.n_seeds=0'], 'config.sae.n_seeds=0'),
        Case('negative_lr', ['--config.sae.lr=-0.001'], 'config.sae.lr=-0.001'),
        Case('sae_seq_len_zero', ['--config.sae.seq_len=0'], 'config.sae.seq_len=0'),
        Case('saelens_d_in_mismatch', ['--config.transfer.source=pretrained',
                                       f'--config.transfer.path={f["sae_d32"]}'],
             'd_in=32', extra=('d_model=64',)),
        Case('transfer_path_missing', ['--config.transfer.source=pretrained',
                                       '--config.transfer.path=/nonexistent/sae'],
             '/nonexistent/sae'),
        Case('tau_above_one', ['--config.analysis.tau=1.5'], 'config.analysis.tau=1.5'),
        Case('tau_zero', ['--config.analysis.tau=0.0'], 'config.analysis.tau=0.0'),
        # data stage
        Case('empty_text_file', data('train', f['empty_txt']), 'empty.txt',
             extra=('zero tokens',)),
        Case('zero_token_documents', data('train', f['blank_jsonl']), 'blank.jsonl',
             extra=('zero tokens',), early=False),
        Case('data_file_wrong_suffix', data('train', f['csv']), 'corpus.csv'),
        Case('data_missing_file', data('train', '/nonexistent/corpus.txt'),
             '/nonexistent/corpus.txt'),
        # config stage
        Case('override_wrong_type', ['--config.sae.k=abc'], "'abc'", extra=('type int',)),
        Case('unknown_field', ['--config.no_such_field=1'], 'no_such_field'),
        Case('nonexistent_config_file', [], 'missing.py', config='configs/missing.py'),
        Case('config_file_syntax_error', [], 'broken_config.py', config=str(f['broken_config'])),
        # non-finite: NaN activations stop the capture of the dense condition, batch by batch
        Case('nan_activations', [f'--config.model={f["nan"]}', *own_data], 'resid_post',
             extra=('stage=capture', 'condition=dense', 'layer=1', 'step='), early=False),
    ]


# --------------------------------------------------------------------------- running them

def _files_under(path: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob('*') if not p.is_dir())


def _run_case(case: Case, workdir: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
    cmd = [sys.executable, str(ROOT / 'launch' / 'run_study.py'), f'--config={case.config}',
           *case.args, f'--workdir={workdir}']
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)


def _check(case: Case, out: subprocess.CompletedProcess, workdir: pathlib.Path) -> list[str]:
    """The contract's violations for one case (empty when it holds)."""
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
    if workdir.exists():
        left = _files_under(workdir)
        if case.early and left:
            problems.append(f'files left in the workdir by an up-front failure: {left}')
        for name in left:
            if name in ('results.json', 'timings.json', 'report.md') or 'tmp' in name:
                problems.append(f'partial output {name!r} left in the workdir')
        stages = workdir / 'stages'
        if stages.exists():
            for stage_dir in stages.iterdir():
                for keyed in stage_dir.iterdir():
                    if keyed.is_dir() and not (keyed / 'DONE').exists():
                        problems.append(f'stage folder {keyed.relative_to(workdir)} has no DONE')
    return problems


def test_catalogue_has_every_stage(files):
    cases = _cases(files)
    assert len(cases) >= 25
    assert len({c.name for c in cases}) == len(cases)


def test_bad_inputs_exit_2_with_one_line_and_leave_nothing_half_written(files, tmp_path):
    cases = _cases(files)
    workdirs = {c.name: tmp_path / c.name / 'work' for c in cases}
    for c in cases:
        workdirs[c.name].parent.mkdir()
    # Two subprocesses at a time: the machine has two cores; each case is its own process.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        runs = {c.name: pool.submit(_run_case, c, workdirs[c.name]) for c in cases}
        results = {name: fut.result() for name, fut in runs.items()}
    failures = {}
    for c in cases:
        problems = _check(c, results[c.name], workdirs[c.name])
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
