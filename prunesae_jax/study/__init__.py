"""The study: configs, the resumable grid (`run`), the workdir and the report.

from prunesae_jax import study
config = study.base_config()            # or configs/<name>.py's get_config()
study.run(config, '/tmp/workdir')       # -> the results dict, also in workdir/results.json
"""

from prunesae_jax.study.config import ConfigError, base_config, paper_base_config, validate
from prunesae_jax.study.pipeline import run

__all__ = ['ConfigError', 'base_config', 'paper_base_config', 'validate', 'run']
