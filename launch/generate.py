r"""Greedy continuation of a prompt by a zoo model (the README's first command).

  python launch/generate.py --model=gemma-3-270m --prompt="The capital of France is" --max_new_tokens=32

The first run converts the model's GGUF from its PyPI package and caches it (see
prunesae_jax/models/zoo.py); later runs load the cache. Only parses flags and calls
`prunesae_jax.models.generate.generate_text`. Bad input exits with status 2 and one line on stderr.
"""

import sys
import time

from absl import app, flags

_MODEL = flags.DEFINE_string('model', 'gemma-3-270m', 'Zoo model name: gemma-3-270m or smollm2-135m.')
_PROMPT = flags.DEFINE_string('prompt', 'The capital of France is', 'Text to continue.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 32, 'Number of tokens to generate.', lower_bound=0)
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16', 'float16'], 'Parameter dtype.')

_BAD_INPUT = 2


def _bad_input(message: str) -> None:
    line = ' '.join(str(message).split())
    sys.stderr.write(f'generate: {line}\n')
    sys.exit(_BAD_INPUT)


def main(argv):
    if len(argv) > 1:
        _bad_input(f'unexpected arguments {argv[1:]}; accepted: --model, --prompt, --max_new_tokens, --dtype')
    # Imported here so that --help and flag errors do not pay for importing JAX.
    from prunesae_jax.models.generate import generate_text  # pylint: disable=g-import-not-at-top

    start = time.time()
    try:
        text = generate_text(_MODEL.value, _PROMPT.value, _MAX_NEW_TOKENS.value, dtype=_DTYPE.value)
    except (ValueError, ImportError, FileNotFoundError) as e:
        _bad_input(e)
    print(f'{_PROMPT.value}{text}')
    sys.stderr.write(f'generate: {_MODEL.value}, {_MAX_NEW_TOKENS.value} new tokens, {time.time() - start:.1f} s\n')


if __name__ == '__main__':
    app.run(main)
