"""Progress bars for long steps (tqdm on stderr, so --json output on stdout stays clean)."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar on stderr, or unchanged when ``enabled`` is False."""
    if not enabled:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
