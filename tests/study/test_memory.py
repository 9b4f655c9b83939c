"""The study's peak memory does not grow with the SAE token budget (bench/scaling.py, small).

Runs configs/smoke.py (one pruned condition, one SAE epoch) at 1x and 4x sae.n_tokens, each in
its own process from an empty workdir, and compares the children's peak RSS (ru_maxrss).
"""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# At 4x tokens the smoke run legitimately holds more of only a few token-proportional arrays:
# the training token ids, the writer's float16 shard buffer (< 2 MiB at 8192 tokens x d=64),
# the trainer's scale / eval samples (capped at 16384 tokens: [2 seeds, 8192, 512] float32 codes
# = 32 MiB at 4x vs 8 MiB at 1x, about three such arrays live at once) and the firing rates.
# That is < 100 MiB; 160 MiB leaves room for allocator noise between two processes (measured
# run-to-run spread of the same run: ~20 MiB) and still fails if e.g. the store is read into
# memory whole several times, activations are kept per step, or the SAE trainer retraces (a
# recompile per step adds ~10 MiB each over 128 steps).
MAX_GROWTH_BYTES = 160 * 2**20


def _scaling():
    spec = importlib.util.spec_from_file_location('scaling', ROOT / 'bench' / 'scaling.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='ru_maxrss in KiB is Linux')
def test_peak_rss_does_not_grow_with_tokens(tmp_path):
    scaling = _scaling()
    config = str(ROOT / 'configs' / 'smoke.py')
    sets = ['pruning.methods=("magnitude",)', 'sae.epochs=1', 'analysis.n_bootstrap=10']
    base = scaling.base_tokens(config, sets)
    runs = [
        scaling.run_once(config, sets, m * base, str(tmp_path / f'x{m}'), str(tmp_path / f'x{m}.log')) for m in (1, 4)
    ]
    for r in runs:
        assert r['rc'] == 0, pathlib.Path(r['log']).read_text()[-2000:]
    growth = runs[1]['peak_rss'] - runs[0]['peak_rss']
    assert growth < MAX_GROWTH_BYTES, (
        f'peak RSS {runs[0]["peak_rss"] / 2**20:.0f} MiB at {base} tokens, '
        f'{runs[1]["peak_rss"] / 2**20:.0f} MiB at {4 * base}: +{growth / 2**20:.0f} MiB'
    )
