"""One home for the limits and defaults of a local USO run.

The nodes (widget ranges, validation), the manifest, the command line and the pipeline read them from
here, so a value is allowed or refused with the same words wherever it enters. The providers' own
limits (fal, AIML) live in `nodes.remote.request`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Limit:
    """A numeric input: its range, default (None: the caller's, e.g. a provider's), required multiple,
    and the hint a refusal ends with. Integer bounds mean whole numbers only."""
    name: str
    low: float
    high: float
    default: float | None
    multiple: int = 1
    hint: str = ""

    def problem(self, value) -> str | None:
        """None when `value` is allowed, else the one message that says what is wrong and what to use."""
        whole = isinstance(self.low, int) and isinstance(self.high, int)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if whole else numbers.Real):
            kind = "a whole number" if whole else "a number"
            return f"{self.name}: expected {kind}, got {value!r}."
        if not whole and math.isnan(value):
            return f"{self.name}: nan is not a number; use {self.low}..{self.high}{self._hint()}."
        if not self.low <= value <= self.high:
            return f"{self.name}: {value} is outside {self.low}..{self.high}{self._hint()}."
        if self.multiple > 1 and value % self.multiple:
            below = value // self.multiple * self.multiple
            return (f"{self.name}: {value} is not a multiple of {self.multiple}{self._hint()}; use "
                    f"{below} or {below + self.multiple}.")
        return None

    def check(self, value):
        """`value` when allowed, else InputError with `problem`'s message."""
        if (message := self.problem(value)) is not None:
            raise InputError(message)
        return value

    def _hint(self) -> str:
        return f" ({self.hint})" if self.hint else ""


SEED_MAX = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed range

WIDTH = Limit("width", 16, 4096, 1024, 16, "FLUX works on 16 px patches; 1024 is USO's native size")
HEIGHT = Limit("height", 16, 4096, 1024, 16, "FLUX works on 16 px patches; 1024 is USO's native size")
STEPS = Limit("steps", 1, 200, 25, hint="the reference uses 25")
GUIDANCE = Limit("guidance", 0.0, 20.0, 4.0, hint="the reference uses 4.0")
SEED = Limit("seed", 0, SEED_MAX, 0)
BATCH_SIZE = Limit("batch_size", 1, 16, 1)
LONG_SIDE = Limit("long_side", 64, 2048, 512, 16, "the reference uses 512")
DENOISE = Limit("denoise", 0.0, 1.0, 1.0, hint="1.0 = from noise; 0.5 keeps half of the input latent's structure")

MAX_REFERENCE_STYLES = 2     # the reference takes at most two style images ...
MAX_REFERENCE_SUBJECTS = 1   # ... and one subject; extra_references allows more
MAX_PROMPT_CHARS = 20000
