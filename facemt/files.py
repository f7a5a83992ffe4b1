"""Files written so that an interrupted process never leaves a half-written
one (temporary name, fsync, rename) with the permissions a new file gets,
and file hashing: one implementation for checkpoints, resume state, reports,
exports, streamed predictions and duplicate detection."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from facemt.errors import FacemtError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp(path: Path) -> str:
    """A temporary file beside ``path`` with the permissions a new file would get
    (mkstemp's own are owner-only)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return tmp


def check_writable(path: str | os.PathLike, overwrite: bool = False, flag: str = "--out") -> Path:
    """Say now, before any work, whether ``path`` can be written: not a folder,
    not an existing file unless ``overwrite``, and its folder writable (a
    temporary file is made there and removed; missing folders are created).

    Raises:
        FacemtError: naming the path and what to do.
    """
    path = Path(path)
    if path.is_dir():
        raise FacemtError(f"{flag} {path}: is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FacemtError(f"{flag} {path}: already exists; choose another name or pass --overwrite")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Path(make_temp(path)).unlink()
    except OSError as exc:
        raise FacemtError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def check_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Say now, before any work, whether ``path`` is or can become a folder this
    process writes into (a temporary file is made there and removed; folders
    made for the check are removed again, so a failure later leaves no trace).

    Raises:
        FacemtError: naming the path and why not.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FacemtError(f"{flag} {path}: is a file; give a folder")
    made = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise FacemtError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    finally:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                pass
    return path


def finish_file(tmp: str) -> None:
    """Give a written temporary file normal permissions and flush it to disk."""
    # Writers may recreate the file with their own mode (safetensors uses 0600).
    os.chmod(tmp, 0o666 & ~_umask())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path`` only if it succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp(path)
    try:
        write(tmp)
        finish_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
