"""Writing files whole or not at all."""

from __future__ import annotations

import os
from collections.abc import Callable


def write_atomically(path, write: Callable[[str], None]) -> None:
    """``write(temporary)`` then rename it to ``path``: a failure leaves whatever ``path`` held (and no
    temporary behind)."""
    path = str(path)
    partial = f"{path}.partial"
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def write_text_atomically(path, text: str) -> None:
    """``text`` to ``path`` by :func:`write_atomically`."""
    def write(target: str) -> None:
        with open(target, "w") as f:
            f.write(text)

    write_atomically(path, write)
