"""Atomic writes: a file or a directory appears whole or not at all (temp beside it, then rename)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _public_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """mkstemp/mkdtemp make 0600/0700 entries; give the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


@contextmanager
def atomic_file(target: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``target`` (same suffix) to write; it replaces ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=target.suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        _public_mode(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside ``target`` to fill; it replaces ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}.", dir=target.parent))
    try:
        yield tmp
        _public_mode(tmp, directory=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


REPO = Path(__file__).resolve().parents[1]


def absolute_local(value: str | None) -> str | None:
    """A relative local path -> absolute (cwd first, then the repo root), so Ray workers and
    replicas, whose working directory differs, find it. URLs, hub ids and "latest" pass through."""
    if not value or "://" in value or value == "latest":
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    for base in (Path.cwd(), REPO):
        if (base / p).exists():
            return str((base / p).resolve())
    return value  # a hub id, or a path that does not exist yet: the loader says which
