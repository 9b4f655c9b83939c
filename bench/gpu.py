"""One-shot GPU benchmark (written for one NVIDIA H200): SAE training and Gemma 3 270M forward throughput.

    pip install -e '.[cuda]' && python bench/gpu.py --budget_s=480          # on the device (`run` tool)
    python bench/gpu.py --from_json=<files_at>/bench_gpu.json                 # back here: write the section
    nice -n 19 python bench/gpu.py --tiny                                     # CPU smoke test, seconds

What it measures, in this order, each in its own try/except (an error is written into the JSON
entry instead of a number) and only while the wall-clock budget (--budget_s, default 480 s,
checked between measurements and inside timing loops) lasts:

  matmul   a plain jitted [B, d] @ [d, n] on the device, float32 at JAX's default matmul precision
           (XLA may run float32 dots on TF32 tensor cores: a rate above the 67 TFLOP/s fp32 peak shows
           it) and bfloat16: the practical peak the SAE step is held to; also as a fraction of the
           nominal peak (TF32 for float32, bf16 for bfloat16).
  sae      prunesae_jax.sae.train's jitted step (make_train_step / init_state, as bench/sae.py builds
           it) for TopK, d_in 640 and 2304, 8x latents, k 32, batch 4096, S = 1, 8, 32 seeds vmapped
           in one step. Parameters, Adam moments and inputs are float32 (the pipeline's only SAE
           dtype); matmuls run at JAX's default precision. Reports tokens x seeds / s and useful
           TFLOP/s (2*B*d*n encoder + 6*B*k*d sparse decode and gradients, per seed, as bench/sae.py)
           as a fraction of the float32 matmul of the same [B, d] @ [d, n] shape.
  forward  Gemma 3 270M ('gemma-3-270m'), params cast to bfloat16, at batch x sequence shapes
           (default 32x512 and 64x1024): 'resid' = the 18 blocks without the unembedding (what SAE
           activation capture runs) and 'nll' = full forward to float32 logits reduced to the mean
           next-token NLL (what perplexity runs; the [B, T, 262144] logits dominate memory). Reports
           tokens / s, useful TFLOP/s (2 * linear weights + causal / sliding-window attention +
           2*D*V unembedding per token) and the roofline fraction = max(FLOPs / peak bf16 FLOP/s,
           weight bytes / HBM bandwidth) / measured time, with NVIDIA's nominal dense peaks for the
           named device (H200: 989 TFLOP/s bf16, 4.8 TB/s); also the fraction of the measured bf16 matmul.

Results: a JSON file ($OUT/bench_gpu.json when $OUT is set, else ./bench_gpu.json; rewritten
after every measurement, so a killed run leaves what it had) and a markdown section 'GPU (<device>)'
of BENCHMARKS.md (via bench/_common.write_section; also saved as gpu_section.md next to the JSON,
because only $OUT comes back from the device machine). --from_json re-renders the section from a
JSON file without measuring anything. The budget counts from the script's start: give the `run`
call a timeout_s that also covers the pip install and jax's import (e.g. 600 for --budget_s=480),
or install in a first `run` call and benchmark in a second while the machine is still warm. A
compile already started is not interrupted, so a run may end up to one compile past the budget.

The model on a machine without internet: the zoo keeps the converted model in
~/.cache/prunesae_jax/gemma-3-270m/hf (config.json + fp32 model.safetensors, ~1 GB; or under
$PRUNESAE_CACHE). The device tool copies the working tree plus at most 8 'carry' paths of 64 MiB in
all, so the weights cannot travel (neither can the 250 MB Q4_K_M GGUF). When neither load_zoo nor
that folder yields weights, the script builds a random-weight model with Gemma 3 270M's exact
config (GEMMA3_270M_HF below, the zoo's config.json; a test checks they agree) and says so in the
JSON and the section: throughput does not depend on weight values. If a machine does hold the
cache (copied there by other means), point PRUNESAE_CACHE at it and the real weights are used.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import traceback

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

# the 64x1024 full forward holds [64, 1024, 262144] logits: let JAX take more than its default 75% of HBM
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')

# Gemma 3 270M's HF config as the zoo converts it (~/.cache/prunesae_jax/gemma-3-270m/hf/config.json).
GEMMA3_270M_HF = {
    'model_type': 'gemma3_text',
    'vocab_size': 262144,
    'hidden_size': 640,
    'intermediate_size': 2048,
    'num_hidden_layers': 18,
    'num_attention_heads': 4,
    'num_key_value_heads': 1,
    'head_dim': 256,
    'max_position_embeddings': 32768,
    'rms_norm_eps': 9.999999974752427e-07,
    'tie_word_embeddings': True,
    'bos_token_id': 2,
    'eos_token_id': 1,
    'pad_token_id': 0,
    'hidden_activation': 'gelu_pytorch_tanh',
    'hidden_act': 'gelu_pytorch_tanh',
    'query_pre_attn_scalar': 256,
    'sliding_window': 512,
    'rope_theta': 1000000.0,
    'rope_local_base_freq': 10000.0,
    'rope_parameters': {
        'full_attention': {'rope_type': 'default', 'rope_theta': 1000000.0},
        'sliding_attention': {'rope_type': 'default', 'rope_theta': 10000.0},
    },
    'attn_logit_softcapping': None,
    'final_logit_softcapping': None,
    'layer_types': (['sliding_attention'] * 5 + ['full_attention']) * 3,
    'sliding_window_pattern': 6,
}

# NVIDIA datasheet dense peaks (no sparsity): FLOP/s per dtype and HBM bytes/s, keyed by device_kind substring.
PEAKS = {
    'H200': {'bfloat16': 989e12, 'tf32': 494e12, 'float32': 67e12, 'hbm_bytes_per_s': 4.8e12},
    'H100': {'bfloat16': 989e12, 'tf32': 494e12, 'float32': 67e12, 'hbm_bytes_per_s': 3.35e12},
}

FULL = dict(
    sae_dims=(640, 2304),
    expansion=8,
    k=32,
    batch=4096,
    seeds=(1, 8, 32),
    steps=20,
    model='gemma-3-270m',
    shapes=((32, 512), (64, 1024)),
    fwd_steps=10,
)
TINY = dict(
    sae_dims=(16,),
    expansion=8,
    k=4,
    batch=64,
    seeds=(1, 2),
    steps=2,
    model='tiny:gemma3_text',
    shapes=((2, 16),),
    fwd_steps=2,
)


class Budget:
    """Wall-clock budget: measurements start only while enough of it is left."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), float(seconds)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def log(msg: str) -> None:
    print(f'[gpu {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def timed_loop(fn, state, steps: int, budget: Budget, min_steps: int = 1):
    """Compiles (first call), then runs up to `steps` calls of state = fn(state) back to back.

    Returns (compile_s, seconds per call, calls timed). The device is synchronised once at the end,
    so dispatch overlaps compute as in a training loop (calls run in order on the device, so the last
    result is ready only when every call is done); the loop stops early when the budget is spent.
    """
    import jax

    t = time.perf_counter()
    state = fn(state)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t
    n, t = 0, time.perf_counter()
    while n < steps and (n < min_steps or budget.left() > 0):
        state = fn(state)
        n += 1
    jax.block_until_ready(state)
    return compile_s, (time.perf_counter() - t) / n, n


def device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    info = {
        'device_kind': dev.device_kind,
        'platform': dev.platform,
        'n_devices': jax.device_count(),
        'backend': jax.default_backend(),
    }
    try:
        stats = dev.memory_stats() or {}
        if 'bytes_limit' in stats:
            info['memory_gib'] = stats['bytes_limit'] / 2**30
    except Exception:  # noqa: BLE001 - not every backend reports memory
        pass
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {'python': platform.python_version()}
    for name in ('jax', 'jaxlib', 'jax-cuda12-plugin', 'flax', 'optax', 'numpy'):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    import jax

    out['jax_default_matmul_precision'] = str(jax.config.jax_default_matmul_precision)
    return out


def peaks_for(kind: str) -> dict | None:
    return next((v for k, v in PEAKS.items() if k in kind), None)


# ----------------------------------------------------------------------------- measurements


def bench_matmul(B: int, d: int, n: int, dtype: str, steps: int, budget: Budget) -> dict:
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (B, d), jnp.float32).astype(dtype)
    w = jax.random.normal(jax.random.key(1), (d, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    # back-to-back calls, one jit dispatch each (no eager ops in between: at H200 speed a [4096, 640] @
    # [640, 5120] takes tens of microseconds); the device runs them in order, so the last one ends the timing
    compile_s, dt, n_calls = timed_loop(lambda _: f(x, w), None, steps * 5, budget)
    return {
        'B': B,
        'd': d,
        'n': n,
        'dtype': dtype,
        'step_s': dt,
        'compile_s': compile_s,
        'timed_calls': n_calls,
        'tflops': 2 * B * d * n / dt / 1e12,
    }


def bench_sae(d: int, expansion: int, k: int, B: int, S: int, steps: int, budget: Budget) -> dict:
    import jax
    import numpy as np

    from prunesae_jax.sae import SAEConfig, TrainConfig
    from prunesae_jax.sae.train import init_state, make_train_step

    n = d * expansion
    cfg = SAEConfig(d, n, k=k)
    t = TrainConfig(n_steps=10_000, n_seeds=S, batch_size=B, progress=False)
    x = jax.random.normal(jax.random.key(2), (B, d))
    state = init_state(cfg, t, np.asarray(x[: min(B, 1024)]))
    step = make_train_step(cfg, t)
    compile_s, dt, n_calls = timed_loop(lambda s: step(s, x)[0], state, steps, budget)
    useful = (2 * B * d * n + 6 * B * k * d) * S
    return {
        'd_in': d,
        'n_latents': n,
        'k': k,
        'batch': B,
        'S': S,
        'dtype': 'float32',
        'step_s': dt,
        'compile_s': compile_s,
        'timed_steps': n_calls,
        'tokens_x_seeds_per_s': B * S / dt,
        'useful_tflops': useful / dt / 1e12,
    }


def load_model(name: str):
    """(cfg, params in bfloat16, source): zoo weights when available, else random weights of the same config."""
    from prunesae_jax.models.config import DecoderConfig
    from prunesae_jax.models.decoder import init_params

    if name.startswith('tiny:'):
        from prunesae_jax.testing import tiny_config

        cfg = tiny_config(name.split(':', 1)[1], dtype='bfloat16')
        return cfg, init_params(cfg, 0), 'random weights (tiny test config)'
    from prunesae_jax.models import zoo
    from prunesae_jax.models.convert import load_hf_folder

    try:
        cfg, params, _ = zoo.load_zoo(name, dtype='bfloat16')
        return cfg, params, f'zoo weights ({zoo.cache_dir(name)})'
    except Exception as e:  # noqa: BLE001 - any failure falls back below
        why = f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
    folder = os.path.join(zoo.cache_dir(name), 'hf')
    if os.path.isfile(os.path.join(folder, 'model.safetensors')):
        try:
            cfg, params = load_hf_folder(folder, dtype='bfloat16')
            return cfg, params, f'cached weights ({folder})'
        except Exception as e:  # noqa: BLE001
            why += f'; {type(e).__name__} reading {folder}'
    if name != 'gemma-3-270m':
        raise RuntimeError(f'model {name!r} could not be loaded ({why}) and has no config to fall back on')
    cfg = DecoderConfig.from_hf(GEMMA3_270M_HF, dtype='bfloat16')
    params = init_params(cfg, 0)  # in cfg.dtype (bfloat16), like the cast zoo weights
    return cfg, params, f'RANDOM weights with the exact Gemma 3 270M config (no cached weights: {why})'


def forward_flops(cfg, T: int, unembed: bool) -> tuple[float, float]:
    """(useful FLOPs per token, bytes of weights read per forward) for a [., T] batch.

    Linear layers 2 * weights; attention 2 * 2 * H * hd * (mean keys attended: causal, capped by the
    sliding window on sliding layers); unembedding 2 * D * V when computed.
    """
    from prunesae_jax.models.config import PRUNABLE
    from prunesae_jax.models.decoder import layer_param_shapes

    shapes = layer_param_shapes(cfg)
    lin = sum(math.prod(shapes[n]) for n in PRUNABLE)
    flops = 2.0 * lin * cfg.num_layers
    for lt in cfg.layer_types:
        w = cfg.sliding_window if lt == 'sliding_attention' else T
        ctx = sum(min(p + 1, w) for p in range(T)) / T
        flops += 4.0 * cfg.num_heads * cfg.head_dim * ctx
    if unembed:
        flops += 2.0 * cfg.hidden_size * cfg.vocab_size
    weights = lin * cfg.num_layers + (cfg.hidden_size * cfg.vocab_size if unembed else 0)
    return flops, 2.0 * weights  # bf16 bytes


def bench_forward(
    cfg, params, kind: str, B: int, T: int, steps: int, budget: Budget, peaks: dict | None, mm_bf16_tflops: float | None
) -> dict:
    import jax
    import jax.numpy as jnp

    from prunesae_jax.models.decoder import forward, resid_post

    tokens = jax.random.randint(jax.random.key(3), (B, T), 3, cfg.vocab_size, dtype=jnp.int32)
    if kind == 'resid':
        last = cfg.num_layers - 1
        f = jax.jit(lambda p, t: resid_post(cfg, p, t, layers=(last,))[last][:, -1, 0].astype(jnp.float32).sum())
    else:

        def f_nll(p, t):  # logsumexp - gold logit: no second [B, T, V] array for the log-probabilities
            logits = forward(cfg, p, t)[:, :-1]
            gold = jnp.take_along_axis(logits, t[:, 1:, None], axis=-1)[..., 0]
            return (jax.nn.logsumexp(logits, axis=-1) - gold).mean()

        f = jax.jit(f_nll)
    compile_s, dt, n_calls = timed_loop(lambda _: f(params, tokens), None, steps, budget)
    flops_tok, wbytes = forward_flops(cfg, T, unembed=kind == 'nll')
    tflops = flops_tok * B * T / dt / 1e12
    row = {
        'kind': kind,
        'batch': B,
        'seq': T,
        'step_s': dt,
        'compile_s': compile_s,
        'timed_steps': n_calls,
        'tokens_per_s': B * T / dt,
        'gflop_per_token': flops_tok / 1e9,
        'useful_tflops': tflops,
        'roofline_frac': None,
        'frac_matmul_bf16': tflops / mm_bf16_tflops if mm_bf16_tflops else None,
    }
    if peaks:
        bound = max(flops_tok * B * T / peaks['bfloat16'], wbytes / peaks['hbm_bytes_per_s'])
        row['roofline_frac'] = bound / dt
    return row


# ----------------------------------------------------------------------------- report


def short_name(kind: str) -> str:
    return next((k for k in PEAKS if k in kind), kind)


def render(res: dict) -> tuple[str, str]:
    """(section title, markdown body) from the results dict."""
    dev = res.get('device', {})
    kind = dev.get('device_kind', 'unknown')
    title = f'GPU ({short_name(kind)})'
    v = res.get('versions', {})
    f3 = lambda x: f'{x:.3f}' if isinstance(x, (int, float)) else '-'
    f2 = lambda x: f'{x:.2f}' if isinstance(x, (int, float)) else '-'
    g = lambda x: f'{x:.3g}'  # tiny CPU runs and H200 runs share the table
    lines = [
        f'`python bench/gpu.py --budget_s={res.get("budget_s", 0):.0f}{" --tiny" if res.get("tiny") else ""}` on '
        f'**{kind}** ({dev.get("n_devices", "?")} device(s), {f2(dev.get("memory_gib"))} GiB; backend '
        f'{dev.get("backend")}), jax {v.get("jax")}, jaxlib {v.get("jaxlib")}, flax {v.get("flax")}; measured '
        f'{res.get("date")}, {res.get("elapsed_s", 0):.0f} s of a {res.get("budget_s", 0):.0f} s budget. '
        'Each time is the mean of back-to-back calls after a compiling call, synchronised once at the end.',
        '',
        '| plain jitted matmul | dtype | ms | TFLOP/s | fraction of nominal peak (TF32 / bf16) |',
        '|---|---|---|---|---|',
    ]
    for m in res.get('matmul', []):
        if 'error' in m:
            lines.append(f'| {m.get("name")} | - | error: {m["error"][:120]} | - | - |')
        else:
            lines.append(
                f'| [{m["B"]},{m["d"]}] @ [{m["d"]},{m["n"]}] | {m["dtype"]} | {m["step_s"] * 1e3:.3f} | '
                f'{g(m["tflops"])} | {f3(m.get("frac_peak"))} |'
            )
    lines += [
        '',
        "SAE training (`prunesae_jax.sae.train` step, TopK, 8x latents, float32 params and inputs at JAX's "
        'default matmul precision; useful FLOPs = 2*B*d*n + 6*B*k*d per seed):',
        '',
        '| d_in | latents | k | batch | seeds S | step ms | tokens x seeds / s | useful TFLOP/s | '
        'fraction of fp32 matmul | compile s |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in res.get('sae', []):
        if 'error' in r:
            lines.append(f'| {r.get("name")} | error: {r["error"][:150]} |||||||||')
        else:
            lines.append(
                f'| {r["d_in"]} | {r["n_latents"]} | {r["k"]} | {r["batch"]} | {r["S"]} | '
                f'{r["step_s"] * 1e3:.2f} | {r["tokens_x_seeds_per_s"]:,.0f} | {g(r["useful_tflops"])} | '
                f'{f2(r.get("frac_matmul_fp32"))} | {r["compile_s"]:.1f} |'
            )
    fw = res.get('forward', {})
    lines += [
        '',
        f'{fw.get("model", "model")} forward, params in bfloat16, {fw.get("source", "")}. resid = the '
        'blocks without unembedding (activation capture); nll = full forward + float32 logits + mean NLL '
        '(perplexity). Roofline fraction = max(FLOPs / nominal bf16 peak, weight bytes / HBM bandwidth) / '
        'measured time.',
        '',
        '| kind | batch x seq | step ms | tokens / s | GFLOP / token | useful TFLOP/s | roofline fraction | '
        'fraction of bf16 matmul | compile s |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in fw.get('rows', []):
        if 'error' in r:
            lines.append(f'| {r.get("name")} | error: {r["error"][:150]} ||||||||')
        else:
            lines.append(
                f'| {r["kind"]} | {r["batch"]}x{r["seq"]} | {r["step_s"] * 1e3:.2f} | '
                f'{r["tokens_per_s"]:,.0f} | {g(r["gflop_per_token"])} | {g(r["useful_tflops"])} | '
                f'{f3(r.get("roofline_frac"))} | {f3(r.get("frac_matmul_bf16"))} | {r["compile_s"]:.1f} |'
            )
    if res.get('skipped'):
        lines += ['', 'Skipped (budget spent): ' + ', '.join(res['skipped']) + '.']
    return title, '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------- main


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """This script's flags. Defined only when the file runs as a script: tests import it as a module
    (under more than one name), and absl refuses a flag that is defined twice."""
    flags.DEFINE_float(
        'budget_s', 480.0, 'Hard wall-clock budget in seconds, checked between measurements and inside timing loops.'
    )
    flags.DEFINE_bool('tiny', False, 'Tiny shapes and a tiny random model (CPU smoke test).')
    flags.DEFINE_string('json', None, 'Results file (default $OUT/bench_gpu.json or ./bench_gpu.json).')
    flags.DEFINE_string(
        'md',
        None,
        'Markdown file for the section (default: the repo BENCHMARKS.md; with '
        "--tiny: none unless given); 'none' to skip.",
    )
    flags.DEFINE_string('from_json', None, 'Only render the section from this results file.')


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments {argv[1:]}')
    md = FLAGS.md if FLAGS.md is not None else ('none' if FLAGS.tiny else _common.BENCHMARKS)
    if FLAGS.from_json:
        with open(FLAGS.from_json) as f:
            res = json.load(f)
        title, body = render(res)
        target = FLAGS.md or _common.BENCHMARKS
        if target != 'none':
            _common.write_section(title, body, target)
        print(f'## {title}\n\n{body}')
        return 0

    budget = Budget(FLAGS.budget_s)
    out_dir = os.environ.get('OUT')
    json_path = FLAGS.json or os.path.join(out_dir or '.', 'bench_gpu.json')
    p = TINY if FLAGS.tiny else FULL

    res = {
        'tiny': FLAGS.tiny,
        'budget_s': FLAGS.budget_s,
        'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
        'settings': {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
        'matmul': [],
        'sae': [],
        'forward': {'model': p['model'], 'rows': []},
        'skipped': [],
        'errors': [],
    }

    def save():
        res['elapsed_s'] = budget.elapsed()
        tmp = json_path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(res, f, indent=1, default=str)
        os.replace(tmp, json_path)

    def attempt(name: str, fn, into: list, reserve: float = 5.0):
        if budget.left() < reserve:
            res['skipped'].append(name)
            log(f'skip {name}: {budget.left():.0f} s of budget left')
            return None
        log(f'start {name} ({budget.left():.0f} s left)')
        try:
            row = fn()
            row['name'] = name
            log(
                f'done {name}: '
                + json.dumps({k: v for k, v in row.items() if not isinstance(v, (dict, list))}, default=str)
            )
        except Exception as e:  # noqa: BLE001 - record and go on to the next measurement
            row = {'name': name, 'error': f'{type(e).__name__}: {e}'[:2000]}
            res['errors'].append(row)
            log(f'FAILED {name}: {row["error"][:300]}')
            traceback.print_exc()
        into.append(row)
        save()
        return row

    try:
        res['device'] = device_info()
    except Exception as e:  # noqa: BLE001
        res['device'] = {'device_kind': 'unknown', 'error': f'{type(e).__name__}: {e}'}
    res['versions'] = versions()
    res['machine'] = _common.machine()
    kind = res['device'].get('device_kind', 'unknown')
    peaks = peaks_for(kind)
    res['peaks'] = peaks
    log(f'device {kind} x{res["device"].get("n_devices")}, {json.dumps(res["versions"])}')
    save()

    B, e, k = p['batch'], p['expansion'], p['k']
    mm = {}
    for d in p['sae_dims']:
        for dt in ('float32', 'bfloat16'):
            r = attempt(f'matmul d{d} {dt}', lambda: bench_matmul(B, d, d * e, dt, p['steps'], budget), res['matmul'])
            if r and 'tflops' in r:
                mm[(d, dt)] = r['tflops']
                if peaks:
                    r['frac_peak'] = r['tflops'] * 1e12 / peaks['tf32' if dt == 'float32' else 'bfloat16']
                    save()

    def sae_rows(d):
        for S in p['seeds']:
            r = attempt(f'sae d{d} S{S}', lambda: bench_sae(d, e, k, B, S, p['steps'], budget), res['sae'], reserve=15)
            if r and 'useful_tflops' in r and (d, 'float32') in mm:
                r['frac_matmul_fp32'] = r['useful_tflops'] / mm[(d, 'float32')]
                save()

    model = {}

    def fwd_rows(shapes):
        if 'cfg' not in model:
            if budget.left() < 30:
                res['skipped'].append('forward (model load)')
                return
            try:
                log(f'loading {p["model"]}')
                cfg, params, source = load_model(p['model'])
                model.update(cfg=cfg, params=params)
                res['forward'].update(
                    source=source, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size
                )
                log(f'model: {source}')
            except Exception as ex:  # noqa: BLE001
                res['forward']['rows'].append({'name': 'load', 'error': f'{type(ex).__name__}: {ex}'[:2000]})
                res['errors'].append(res['forward']['rows'][-1])
                save()
                return
        mm_bf16 = max((v for (dd, dt), v in mm.items() if dt == 'bfloat16'), default=None)
        for bb, T in shapes:
            for kd in ('resid', 'nll'):
                attempt(
                    f'forward {kd} {bb}x{T}',
                    lambda: bench_forward(
                        model['cfg'], model['params'], kd, bb, T, p['fwd_steps'], budget, peaks, mm_bf16
                    ),
                    res['forward']['rows'],
                    reserve=20,
                )

    # most informative first, so a short budget still covers every kind of measurement once
    sae_rows(p['sae_dims'][0])
    fwd_rows(p['shapes'][:1])
    for d in p['sae_dims'][1:]:
        sae_rows(d)
    fwd_rows(p['shapes'][1:])
    save()

    title, body = render(res)
    section_path = os.path.join(os.path.dirname(os.path.abspath(json_path)), 'gpu_section.md')
    with open(section_path, 'w') as f:
        f.write(f'## {title}\n\n{body}')
    if md != 'none':
        _common.write_section(title, body, md)
        log(f'wrote section {title!r} of {md}')
    print(f'## {title}\n\n{body}', flush=True)
    log(f'wrote {json_path} ({len(res["errors"])} errors, {len(res["skipped"])} skipped) in {budget.elapsed():.0f} s')
    return 0


if __name__ == '__main__':
    _define_flags()
    app.run(main)
