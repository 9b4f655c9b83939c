"""Errors shared by every stage, so the launcher can tell bad input from a bug.

- `InputError` (a ValueError): the user's input is wrong (a file, a shape, a value out of range).
  Its message is one line naming the value and what is accepted. `MissingFileError` is the one
  for a path that does not exist (also a FileNotFoundError); `DiskFullError` for a write that found
  no space left on the device (ENOSPC / EDQUOT; also an OSError, with that errno).
- `NonFiniteError` (a FloatingPointError): NaN or inf appeared in a computation. It names the
  stage, the condition, the layer and the step where it was seen, so a long run that dies says
  where; a stage that catches it on the way out adds the fields it knows with `with_context`.
"""

from __future__ import annotations

import dataclasses

__all__ = ['InputError', 'MissingFileError', 'DiskFullError', 'NonFiniteError', 'first_nonfinite']


class InputError(ValueError):
    """Bad user input; the message is one line naming the value and what is accepted."""


class MissingFileError(InputError, FileNotFoundError):
    """A path the user gave does not exist (still a FileNotFoundError for callers that expect one)."""


class DiskFullError(InputError, OSError):
    """A write found no space left (ENOSPC) or no quota left (EDQUOT) where the user asked to write.

    Still an OSError whose errno is that of the failed write, for callers that expect one.
    """

    def __init__(self, message: str, errno_: int | None = None):
        InputError.__init__(self, message)
        self.errno = errno_

    def __str__(self) -> str:
        return self.args[0]


@dataclasses.dataclass
class NonFiniteError(FloatingPointError):
    """NaN / inf found by a guard.

    Attributes:
      what: the quantity that went non-finite, e.g. 'SAE loss', 'resid_post', 'Wanda input norms'.
      stage: the pipeline stage ('capture', 'calibration', 'sae', 'perplexity', ...).
      condition: e.g. 'wanda@0.5', or None where not known yet.
      layer: the decoder layer, or None.
      step: the training step / batch index, or None.
      detail: anything else worth printing (e.g. 'seed 2', 'last good checkpoint: step 400').
    """

    what: str
    stage: str | None = None
    condition: str | None = None
    layer: int | None = None
    step: int | None = None
    detail: str | None = None

    def __post_init__(self):
        super().__init__(str(self))

    def __str__(self) -> str:
        where = [f'{name}={getattr(self, name)}' for name in ('stage', 'condition', 'layer', 'step')]
        line = f'non-finite (NaN or inf) {self.what}; ' + ', '.join(where)
        return line + (f'; {self.detail}' if self.detail else '')

    def with_context(self, **fields) -> 'NonFiniteError':
        """A copy with the given fields filled in where they are still None (detail is appended)."""
        updates = {k: v for k, v in fields.items() if k != 'detail' and getattr(self, k) is None}
        detail = fields.get('detail')
        if detail:
            updates['detail'] = f'{self.detail}; {detail}' if self.detail else detail
        return dataclasses.replace(self, **updates)


def first_nonfinite(a) -> tuple[int, tuple[int, ...]] | None:
    """None when every value of the array `a` is finite, else (how many are not, the index of the
    first): what an error message about NaN / inf in a tensor names."""
    import numpy as np  # pylint: disable=g-import-not-at-top

    finite = np.isfinite(a)
    if finite.all():
        return None
    return int((~finite).sum()), tuple(int(i) for i in np.argwhere(~finite)[0])
