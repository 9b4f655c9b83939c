r"""Runs the study: checkpoint -> pruned models -> SAEs -> measures -> report.

  python launch/run_study.py --config=configs/default.py --workdir=/tmp/prunesae_default
  python launch/run_study.py --config=configs/smoke.py --workdir=/tmp/smoke \
      --config.pruning.sparsities='(0.0, 0.5)' --config.sae.n_seeds=3

Only parses flags and calls `prunesae_jax.study.run(config, workdir)`. Bad input (a flag, a
config value, a checkpoint, a corpus, an unwritable --workdir: prunesae_jax.errors.InputError) and
NaN / inf in a computation (NonFiniteError, naming stage, condition, layer and step) exit with
status 2 and one line 'run_study: ...' on stderr, no traceback; finished stages stay cached.
"""

import os
import re
import sys
import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/default.py', 'Path to a config file (get_config() -> ConfigDict).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for cached stages, results and report.')
flags.mark_flag_as_required('workdir')

_BAD_INPUT = 2
_CONFIG_FILE = 'a Python file whose get_config() returns a ConfigDict (e.g. configs/smoke.py)'
_INTERRUPTED = 75  # EX_TEMPFAIL: try again


def _bad_input(message: str) -> None:
    line = ' '.join(str(message).split())
    sys.stderr.write(f'run_study: {line}\n')
    sys.exit(_BAD_INPUT)


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


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _bad_input(f'{e}{_accepted_type(str(e))}')
    except AttributeError as e:  # an override of a field the config does not have
        name = str(e).strip('"\'')
        _bad_input(f'unknown config field {name!r}; accepted: --config.<field> for the fields of '
                   'prunesae_jax.study.config.base_config()')
    except (ValueError, FileNotFoundError, SyntaxError, ImportError) as e:
        # config_flags loads the config file while parsing: a broken file is bad input too.
        _bad_input(f'{type(e).__name__}: {e}; accepted: {_CONFIG_FILE}')


def _check_workdir(path: str) -> None:
    """--workdir must be (or be creatable as) a writable folder; checked before anything is written."""
    from prunesae_jax.errors import InputError  # pylint: disable=g-import-not-at-top
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(full) and not os.path.isdir(full):
        raise InputError(f'--workdir={path!r} is a file; accepted: a writable folder (new or existing)')
    probe = full
    while not os.path.exists(probe):  # the nearest existing folder is where mkdir would write
        probe = os.path.dirname(probe)
    try:  # os.access trusts mode bits (root passes them all); creating a folder is the real test
        os.rmdir(tempfile.mkdtemp(prefix='.run_study_probe_', dir=probe))
    except OSError as e:
        where = '' if probe == full else f' (its parent {probe!r} is not writable)'
        raise InputError(f'--workdir={path!r} is not writable{where}: {e.strerror}; accepted: a folder '
                         'this user can write to') from None


def main(argv):
    if len(argv) > 1:
        _bad_input(f'unexpected arguments {argv[1:]}; accepted: --config, --config.<field>, --workdir')
    from prunesae_jax import study  # pylint: disable=g-import-not-at-top
    from prunesae_jax.errors import InputError, NonFiniteError  # pylint: disable=g-import-not-at-top
    from prunesae_jax.study.pipeline import StudyInterrupted  # pylint: disable=g-import-not-at-top
    config = _CONFIG.value
    error = getattr(config, '_error', None)  # config_flags defers a config file's load error
    if isinstance(error, BaseException):
        _bad_input(f'--config={flags.FLAGS["config"].config_filename}: {error}; accepted: {_CONFIG_FILE}')
    try:
        study.validate(config)  # config errors first, then the workdir, then the model
        if config.distributed.enabled:  # multi-host: before anything touches a JAX backend
            from prunesae_jax.sharding import initialize_distributed  # pylint: disable=g-import-not-at-top
            d = config.distributed
            initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
        _check_workdir(_WORKDIR.value)
        study.run(config, _WORKDIR.value)
    except InputError as e:  # ConfigError included
        _bad_input(e)
    except NonFiniteError as e:  # the stages finished before it stay cached: fix and re-run
        _bad_input(e)
    except StudyInterrupted as e:  # $PRUNESAE_STOP_AFTER_CONDITIONS: re-run to resume
        sys.stderr.write(f'run_study: {e}\n')
        sys.exit(_INTERRUPTED)


if __name__ == '__main__':
    app.run(main, flags_parser=_parse_flags)
