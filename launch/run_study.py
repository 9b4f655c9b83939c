r"""Runs the study: checkpoint -> pruned models -> SAEs -> measures -> report.

  python launch/run_study.py --config=configs/default.py --workdir=/tmp/prunesae_default
  python launch/run_study.py --config=configs/smoke.py --workdir=/tmp/smoke \
      --config.pruning.sparsities='(0.0, 0.5)' --config.sae.n_seeds=3

Only parses flags and calls `prunesae_jax.study.run(config, workdir)`. What it prints when the run
does not finish, always one line 'run_study: ...' on stderr and no traceback (finished stages stay
cached; re-running the same command resumes):
  - bad input (a flag, a config file or value, a checkpoint, a corpus, a --workdir that is not a
    writable folder for the study, a full disk: prunesae_jax.errors.InputError) and NaN / inf in a
    computation (NonFiniteError, naming stage, condition, layer and step): exit status 2;
  - SIGINT (Ctrl-C) or SIGTERM: 'interrupted during <stage>; re-run the same command to resume',
    exit status 130 or 143 (a second signal stops at once; the workdir stays resumable);
  - anything else (a bug): the error in one line and the path of its full traceback, written to
    <workdir>/run_study.error.log (or the temp folder when there is no workdir yet): exit status 1.
A damaged cache (a truncated or altered stage file, a garbled DONE, a damaged SAE checkpoint) is
named in one log line and recomputed; it never blocks the workdir (prunesae_jax/study/workdir.py).
"""

import logging
import os
import re
import signal
import sys
import tempfile
import traceback

# A clean log: transformers' advisory "PyTorch was not found" (torch is a test-only dependency) and
# JAX's probe for a TPU runtime on machines without one say nothing about this program.
os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')
logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)

from absl import app, flags
from absl import logging as absl_logging


class _QuietLibraries(logging.Filter):
    """Drops the INFO records Orbax writes through absl's logger (about 25 per checkpoint); its
    warnings and errors, and this program's own lines, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


absl_logging.get_absl_logger().addFilter(_QuietLibraries())
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/default.py', 'Path to a config file (get_config() -> ConfigDict).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for cached stages, results and report.')
flags.mark_flag_as_required('workdir')

_BAD_INPUT = 2
_BUG = 1
_CONFIG_FILE = 'a Python file whose get_config() returns a ConfigDict (e.g. configs/smoke.py)'
_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as shells report it
_ERROR_LOG = 'run_study.error.log'  # == prunesae_jax.study.workdir.ERROR_LOG (not imported: slow)
# Names a study writes at the top of its workdir (a folder holding none of them and other files is
# not a study's workdir: the wrong place, e.g. the current directory).
_STUDY_NAMES = ('stages', 'config.json', 'results.json', '.lock', 'report.md', 'timings.json', _ERROR_LOG)

_signalled: list[int] = []  # the signal that interrupted the run, once one has


def _on_signal(signum, frame):
    del frame
    _signalled.append(signum)
    for sig in _SIGNAL_EXIT:  # a second signal stops at once (a kill is safe for the workdir)
        signal.signal(sig, signal.SIG_DFL)
    raise KeyboardInterrupt


def _bad_input(message: str) -> None:
    line = ' '.join(str(message).split())
    sys.stderr.write(f'run_study: {line}\n')
    sys.exit(_BAD_INPUT)


def _interrupted() -> None:
    """One line and 130 / 143 for SIGINT / SIGTERM."""
    signum = _signalled[0] if _signalled else signal.SIGINT
    where = 'startup'
    module = sys.modules.get('prunesae_jax.study.workdir')
    if module is not None:
        where = module.current_activity()
    sys.stderr.write(f'run_study: interrupted during {where}; re-run the same command to resume\n')
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter shutdown: the stack has unwound (stage temp folders removed, the workdir lock
    # released); what is left are library threads, whose teardown after an interrupt may print.
    os._exit(_SIGNAL_EXIT.get(signum, 130))  # pylint: disable=protected-access


def _accepted_type(message: str) -> str:
    """'; accepted: <type>' for a --config.<field> override of the wrong type, else ''."""
    m = re.match(r'flag --config\.([\w.]+)=', message)
    if not m:
        return ''
    from prunesae_jax.study.config import base_config  # pylint: disable=g-import-not-at-top

    value = base_config()
    try:
        for part in m.group(1).split('.'):
            value = value[part]
    except (KeyError, AttributeError, TypeError):
        return ''
    return f'; accepted: type {type(value).__name__} (e.g. {value!r})'


def _config_arg(argv) -> str:
    """The --config value on the command line (its file part), or the flag's default."""
    value = 'configs/default.py'  # the flag's default
    for i, a in enumerate(argv[1:], 1):
        if a.startswith('--config='):
            value = a[len('--config=') :]
        elif a == '--config' and i + 1 < len(argv):
            value = argv[i + 1]
    return value.split(':', 1)[0]


def _raised_in(e: BaseException, path: str) -> str | None:
    """Where in the config file `path` the traceback of `e` passes: 'get_config()' or 'loading it'
    (its module-level code); None when it does not pass through the file."""
    want = os.path.realpath(path)
    tb, where = e.__traceback__, None
    while tb is not None:
        code = tb.tb_frame.f_code
        if os.path.realpath(code.co_filename) == want:
            where = 'get_config()' if code.co_name == 'get_config' or where == 'get_config()' else ('loading it')
        tb = tb.tb_next
    return where


def _parse_flags(argv):
    if any(a in ('-h', '-?', '--help', '--helpshort', '--helpfull') for a in argv[1:]):
        # absl's own --help exits with status 1; asking for help is not an error.
        sys.stdout.write(f'{__doc__}\nflags:\n{flags.FLAGS.main_module_help()}\n')
        sys.exit(0)
    path = _config_arg(argv)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except
        # config_flags runs the config file (and its get_config()) while parsing the flags; for a
        # TypeError / ValueError it raises one whose message holds the whole traceback.
        text = str(e)
        if 'Error whilst parsing config file' in text:
            error = [ln for ln in text.splitlines() if ln.strip()][-1].strip()  # 'ValueError: ...'
            _bad_input(f'--config={path}: get_config() raised {error}; accepted: {_CONFIG_FILE}')
        if isinstance(e, flags.Error):
            _bad_input(f'{e}{_accepted_type(text)}')
        if isinstance(e, AttributeError) and re.search(r"has no attribute '?get_config", text):
            _bad_input(f'--config={path} has no get_config(); accepted: {_CONFIG_FILE}')
        where = _raised_in(e, path)
        if where:
            _bad_input(f'--config={path}: {where} raised {type(e).__name__}: {text}; accepted: {_CONFIG_FILE}')
        if isinstance(e, AttributeError):  # an override of a field the config does not have
            name = text.strip('"\'')
            _bad_input(
                f'unknown config field {name!r}; accepted: --config.<field> for the fields of '
                'prunesae_jax.study.config.base_config()'
            )
        if isinstance(e, (ValueError, FileNotFoundError, SyntaxError, ImportError, OSError)):
            # a broken config file (not found, not Python, an import it lacks) is bad input too
            _bad_input(f'--config={path}: {type(e).__name__}: {text}; accepted: {_CONFIG_FILE}')
        _unexpected(e)


def _dangling(path: str) -> str | None:
    """The first part of `path` that is a symlink to nothing, or None."""
    probe = path
    while True:
        if os.path.islink(probe) and not os.path.exists(probe):
            return probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent


def _check_workdir(path: str) -> None:
    """--workdir must be (or be creatable as) a writable folder that is empty or a study's own;
    checked before anything is written."""
    from prunesae_jax.errors import InputError  # pylint: disable=g-import-not-at-top
    from prunesae_jax.study.workdir import check_layout  # pylint: disable=g-import-not-at-top

    if not path or not path.strip():
        raise InputError(
            f'--workdir={path!r} is empty; accepted: the path of a folder for the study '
            '(new, empty, or the workdir of an earlier run)'
        )
    full = os.path.abspath(os.path.expanduser(path))
    link = _dangling(full)
    if link is not None:
        raise InputError(
            f'--workdir={path!r}: {link!r} is a symlink to nothing ({os.readlink(link)!r});'
            ' accepted: a folder, or a link to an existing folder'
        )
    if os.path.exists(full) and not os.path.isdir(full):
        raise InputError(f'--workdir={path!r} is a file; accepted: a writable folder (new or existing)')
    if os.path.isdir(full):
        try:
            names = os.listdir(full)
        except OSError as e:
            raise InputError(
                f'--workdir={path!r} cannot be read ({e.strerror}); accepted: a folder this user can read and write'
            ) from None
        own = [n for n in names if not n.startswith('.') and n != 'lost+found']
        if own and not any(n in names for n in _STUDY_NAMES):
            shown = ', '.join(sorted(own)[:5]) + (', ...' if len(own) > 5 else '')
            raise InputError(
                f'--workdir={path!r} is a folder with other files ({shown}) and no study '
                'in it; accepted: a new or empty folder, or the workdir of an earlier run'
            )
        check_layout(full, f'--workdir={path!r}')
    probe = full
    while not os.path.exists(probe):  # the nearest existing folder is where mkdir would write
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise InputError(
            f'--workdir={path!r}: {probe!r} is a file, not a folder; accepted: a path whose parts are folders'
        )
    try:  # os.access trusts mode bits (root passes them all); creating a folder is the real test
        os.rmdir(tempfile.mkdtemp(prefix='.run_study_probe_', dir=probe))
    except OSError as e:
        where = '' if probe == full else f' (its parent {probe!r} is not writable)'
        raise InputError(
            f'--workdir={path!r} is not writable{where}: {e.strerror}; accepted: a folder this user can write to'
        ) from None


def _check_backend() -> None:
    """The JAX backend starts (a $JAX_PLATFORMS this machine lacks is bad input, found here)."""
    import jax  # pylint: disable=g-import-not-at-top

    from prunesae_jax.errors import InputError  # pylint: disable=g-import-not-at-top

    try:
        jax.devices()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        platforms = os.environ.get('JAX_PLATFORMS', '')
        raise InputError(
            f'JAX found no usable backend ($JAX_PLATFORMS={platforms!r}): {first}; '
            'accepted: a platform this machine has (e.g. JAX_PLATFORMS=cpu, or unset)'
        ) from None


def _disk_full(e: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError in the chain of `e` (a write that found the disk full), or None."""
    import errno  # pylint: disable=g-import-not-at-top

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


def _log_name() -> str:
    """run_study.error.log; run_study.error.process<i>.log for process i > 0 of a jax.distributed
    run (read without starting a backend), so the processes of one workdir keep their own logs."""
    state = getattr(sys.modules.get('jax._src.distributed'), 'global_state', None)
    i = getattr(state, 'process_id', 0) or 0
    return _ERROR_LOG if i == 0 else _ERROR_LOG.replace('.log', f'.process{i}.log')


def _error_log(workdir: str | None, text: str) -> str:
    """Writes `text` to <workdir>/run_study.error.log (or a temp file); returns its path."""
    folder = None
    if workdir and workdir.strip():
        full = os.path.abspath(os.path.expanduser(workdir))
        if os.path.isdir(full):
            folder = full
    paths = [os.path.join(folder, _log_name())] if folder else []
    paths.append(os.path.join(tempfile.gettempdir(), f'run_study.error.{os.getpid()}.log'))
    for p in paths:
        try:
            with open(p, 'w', encoding='utf-8') as f:
                f.write(text)
            return p
        except OSError:
            continue
    return '(could not be written)'


def _unexpected(e: BaseException) -> None:
    """One line naming the error and where its traceback was written; exit status 1."""
    module = sys.modules.get('prunesae_jax.study.workdir')
    where = module.current_activity() if module is not None else 'startup'
    text = ''.join(traceback.format_exception(e))
    try:
        workdir = _WORKDIR.value
    except flags.Error:  # the flags are not parsed yet
        workdir = None
    log = _error_log(workdir, f'run_study: unexpected error during {where}\nargv: {sys.argv}\n\n{text}')
    first = (str(e).strip().splitlines() or [''])[0][:300]
    sys.stderr.write(
        f'run_study: unexpected {type(e).__name__} during {where}: {first}; this is '
        f'a bug, not known bad input; the full traceback is in {log}; finished stages '
        'stay cached\n'
    )
    sys.exit(_BUG)


def main(argv):
    if len(argv) > 1:
        _bad_input(f'unexpected arguments {argv[1:]}; accepted: --config, --config.<field>, --workdir')
    from ml_collections import config_dict  # pylint: disable=g-import-not-at-top

    from prunesae_jax import study  # pylint: disable=g-import-not-at-top
    from prunesae_jax.errors import DiskFullError, InputError, NonFiniteError  # pylint: disable=g-import-not-at-top

    path = flags.FLAGS['config'].config_filename
    config = flags.FLAGS['config'].value
    error = getattr(config, '_error', None)  # config_flags defers a config file's load error
    if isinstance(error, BaseException):
        _bad_input(f'--config={path}: {error}; accepted: {_CONFIG_FILE}')
    if not isinstance(config, (config_dict.ConfigDict, config_dict.FrozenConfigDict)):
        _bad_input(
            f'--config={path}: get_config() returned {type(config).__name__} '
            f'{str(config)[:60]!r}; accepted: {_CONFIG_FILE}'
        )
    try:
        study.validate(config)  # config errors first, then the workdir, then the model
        _check_workdir(_WORKDIR.value)
        if config.distributed.enabled:  # multi-host: before anything touches a JAX backend
            from prunesae_jax.sharding import initialize_distributed  # pylint: disable=g-import-not-at-top

            d = config.distributed
            initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
        _check_backend()
        study.run(config, _WORKDIR.value)
    except KeyboardInterrupt:
        _interrupted()
    except DiskFullError as e:  # prunesae_jax/io.py names the file; the study's remedy is added
        _bad_input(
            f'{e}; finished stages stay cached: re-run the same command once there is space, '
            'or choose another --workdir'
        )
    except (InputError, NonFiniteError) as e:  # ConfigError included
        _bad_input(e)  # NaN / inf: the stages finished before it stay cached: fix and re-run
    except Exception as e:  # pylint: disable=broad-except
        if _signalled:  # a library turned the interrupt into its own error
            _interrupted()
        full = _disk_full(e)
        if full is not None:
            where = f' writing {full.filename!r}' if getattr(full, 'filename', None) else ''
            _bad_input(
                f'no space left on the device{where} ({full.strerror or full}); accepted: a '
                'workdir with free space (free some, or choose another --workdir); finished '
                'stages stay cached'
            )
        _unexpected(e)
    stale = os.path.join(os.path.abspath(os.path.expanduser(_WORKDIR.value)), _log_name())
    if os.path.isfile(stale):  # the error it recorded is behind us
        os.unlink(stale)


if __name__ == '__main__':
    for _sig in _SIGNAL_EXIT:
        signal.signal(_sig, _on_signal)
    try:
        app.run(main, flags_parser=_parse_flags)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as _e:  # pylint: disable=broad-except  # e.g. an import that fails in main()
        if _signalled:
            _interrupted()
        _unexpected(_e)
