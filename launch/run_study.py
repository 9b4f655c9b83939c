r"""Runs the study: checkpoint -> pruned models -> SAEs -> measures -> report.

  python launch/run_study.py --config=configs/default.py --workdir=/tmp/prunesae_default
  python launch/run_study.py --config=configs/smoke.py --workdir=/tmp/smoke \
      --config.pruning.sparsities='(0.0, 0.5)' --config.sae.n_seeds=3

Only parses flags and calls `prunesae_jax.study.run(config, workdir)`. A bad
flag or config value exits with status 2 and one line on stderr.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/default.py', 'Path to a config file (get_config() -> ConfigDict).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for cached stages, results and report.')
flags.mark_flag_as_required('workdir')

_BAD_INPUT = 2
_INTERRUPTED = 75  # EX_TEMPFAIL: try again


def _bad_input(message: str) -> None:
    line = ' '.join(str(message).split())
    sys.stderr.write(f'run_study: {line}\n')
    sys.exit(_BAD_INPUT)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _bad_input(e)
    except (ValueError, FileNotFoundError, SyntaxError, ImportError, AttributeError) as e:
        # config_flags loads the config file while parsing: a broken file is bad input too.
        _bad_input(f'{type(e).__name__}: {e}')


def main(argv):
    if len(argv) > 1:
        _bad_input(f'unexpected arguments {argv[1:]}; accepted: --config, --config.<field>, --workdir')
    from prunesae_jax import study  # pylint: disable=g-import-not-at-top
    from prunesae_jax.study.config import ConfigError  # pylint: disable=g-import-not-at-top
    from prunesae_jax.study.pipeline import StudyInterrupted  # pylint: disable=g-import-not-at-top
    config = _CONFIG.value
    error = getattr(config, '_error', None)  # config_flags defers a config file's load error
    if isinstance(error, BaseException):
        _bad_input(f'--config={flags.FLAGS["config"].config_filename}: {error}')
    try:
        study.run(config, _WORKDIR.value)
    except ConfigError as e:
        _bad_input(e)
    except StudyInterrupted as e:  # $PRUNESAE_STOP_AFTER_CONDITIONS: re-run to resume
        sys.stderr.write(f'run_study: {e}\n')
        sys.exit(_INTERRUPTED)


if __name__ == '__main__':
    app.run(main, flags_parser=_parse_flags)
