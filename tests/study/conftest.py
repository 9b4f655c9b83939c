"""Study tests compile the same small programs many times (one per condition and per run):
a persistent compilation cache for the session turns the repeats into cache hits."""

import jax
import pytest


@pytest.fixture(scope='session', autouse=True)
def _jax_compilation_cache(tmp_path_factory):
    if jax.config.jax_compilation_cache_dir:  # the user's own cache wins
        yield
        return
    jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    yield
    jax.config.update('jax_compilation_cache_dir', None)
