"""Where jobs run, known before anything loads: USO on this machine (real or tiny random models)
or the hosted USO of a provider (fal, AIML).

The manifest checks, the runners, the command line and the API ask a `Backend` what differs
between the two (`is_local`, `defaults`, `name`) instead of comparing names. `nodes.api` makes the
USO that runs it (`api.open_backend`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..engine import limits
from ..remote import PROVIDERS

#: USO Generate's defaults (and USO Encode Style / Subject's): the API's and the command line's.
DEFAULTS = dict(prompt="", width=limits.WIDTH.default, height=limits.HEIGHT.default, keep_size=False,
                steps=limits.STEPS.default, guidance=limits.GUIDANCE.default, seed=limits.SEED.default,
                batch_size=limits.BATCH_SIZE.default, style_crop="reference", long_side=limits.LONG_SIDE.default,
                shift="reference")
#: What the tiny random models use instead, so the whole path runs in seconds.
TINY_DEFAULTS = dict(width=64, height=64, steps=4, long_side=64)
#: USO Remote Generate's defaults where they differ (the providers' own default step count).
REMOTE_DEFAULTS = dict(steps=28)
TINY_NOTICE = ("SMOKE TEST (--tiny): random tiny models, no weights were loaded. This checks the "
               "install end to end; the images are noise by design.")


@dataclass(frozen=True)
class Backend:
    """`Backend()` runs USO here, `Backend(tiny=True)` on random tiny models (a smoke test, the
    images are noise), `Backend(provider="fal")` on fal (or "aiml")."""

    provider: str | None = None     # None: this machine
    tiny: bool = False

    def __post_init__(self):
        if self.provider is not None and self.provider not in PROVIDERS:
            raise ValueError(f"provider: '{self.provider}' is not one of {', '.join(PROVIDERS)}")
        if self.provider is not None and self.tiny:
            raise ValueError("tiny: the random tiny models run locally; a provider runs its own USO")

    @property
    def is_local(self) -> bool:
        return self.provider is None

    @property
    def name(self) -> str:
        """'local', 'tiny', 'fal' or 'aiml': what the PNG parameters and the summary record."""
        return self.provider or ("tiny" if self.tiny else "local")

    @property
    def defaults(self) -> dict:
        """USO Generate's defaults on this backend (tiny sizes on the tiny models, the providers'
        step count remotely)."""
        return {**DEFAULTS, **(TINY_DEFAULTS if self.tiny else {}), **({} if self.is_local else REMOTE_DEFAULTS)}
