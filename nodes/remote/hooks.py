"""What the remote clients need from their caller, as plain callables (no ComfyUI here)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def _never() -> bool:
    return False


def _ignore(_value) -> None:
    return None


@dataclass(frozen=True)
class Hooks:
    is_cancelled: Callable[[], bool] = _never  # polled at least every 0.1 s while waiting
    report: Callable[[str], None] = _ignore  # status text for the user (queue position, elapsed, warnings)
    progress: Callable[[float], None] = _ignore  # 0..1 by stage; providers report no step counts
