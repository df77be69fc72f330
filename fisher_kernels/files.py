"""Writing files whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable


def write_atomically(path, write: Callable[[str], None]) -> None:
    """``write(temporary)`` then rename it to ``path``: a failure leaves whatever ``path`` held (and no
    temporary behind)."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as save_pretrained does
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


def staging_directory(directory) -> str:
    """A fresh temporary directory beside ``directory`` (same file system, so renames are atomic)."""
    parent = os.path.dirname(os.path.abspath(str(directory)))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(str(directory))}.partial-", dir=parent)


def publish_directories(pairs: list[tuple[str, str]]) -> None:
    """Move each staged directory to its place, all or none: ``[(staged, directory), ...]``.

    Files of an existing ``directory`` that were not written stay (linked into the staged tree first);
    each existing directory is renamed aside, the staged one renamed into place, and the old ones
    removed only once every pair is in place. A failure puts back every directory as it was."""
    for staged, directory in pairs:
        if os.path.isdir(directory):
            _keep_unwritten(str(directory), staged)
    moved: list[tuple[str, str, str | None]] = []  # (staged, directory, where the old directory went)
    try:
        for staged, directory in pairs:
            directory = str(directory)
            old = None
            if os.path.exists(directory):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.replaced-",
                                       dir=os.path.dirname(os.path.abspath(directory)))
                os.rmdir(old)
                os.rename(directory, old)
            moved.append((staged, directory, old))
            os.rename(staged, directory)
    except BaseException:
        for staged, directory, old in reversed(moved):
            if os.path.exists(directory) and not os.path.exists(staged):
                os.rename(directory, staged)  # the staging area, removed by the caller
            if old is not None:
                os.rename(old, directory)
        raise
    for _, _, old in moved:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _keep_unwritten(directory: str, staged: str) -> None:
    """Files of ``directory`` the staged tree does not replace, linked (or copied) into it."""
    for folder, _, files in os.walk(directory):
        target = os.path.join(staged, os.path.relpath(folder, directory))
        os.makedirs(target, exist_ok=True)
        for name in files:
            destination = os.path.join(target, name)
            if not os.path.exists(destination):
                try:
                    os.link(os.path.join(folder, name), destination)
                except OSError:
                    shutil.copy2(os.path.join(folder, name), destination)
