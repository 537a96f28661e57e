"""Atomic writes: a file or a directory appears whole or not at all (temp beside it, then rename);
and outputs that go to a local directory or an ``s3://`` prefix alike (``location``,
``join``, ``write_text``, ``staged_dir``)."""
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


REPO = Path(__file__).resolve().parents[2]


def absolute_local(value: str | None) -> str | None:
    """A relative local path -> absolute (cwd first, then the repo root), so Ray workers and
    replicas, whose working directory differs, find it; a shard pattern (``dir/train-{000..009}.tar``)
    by its directory. URLs, hub ids and "latest" pass through."""
    if not value or "://" in value or value == "latest":
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    probe = p.parent if "{" in p.name else p
    for base in (Path.cwd(), REPO):
        if (base / probe).exists():
            return str((base / p).resolve())
    return value  # a hub id, or a path that does not exist yet: the loader says which


def repo_relative(value: str | os.PathLike | None) -> str | None:
    """An absolute path inside the repository -> relative to it (records and exports name no
    machine paths); anything else (relative paths, URLs, hub ids, paths elsewhere, None) unchanged."""
    if value is None:
        return None
    p = Path(value)
    if "://" in str(value) or not p.is_absolute():
        return str(value)
    p = p.resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(value)


# ------------------------------------------------------------- local or s3:// outputs

def location(value: str | os.PathLike) -> str:
    """A local path or ``s3://`` URL as a string; a URL that went through pathlib
    (``Path("s3://b/k")`` is ``s3:/b/k``) gets its second slash back."""
    s = os.fspath(value)
    return "s3://" + s[len("s3:/"):] if s.startswith("s3:/") and not s.startswith("s3://") else s


def is_remote(value: str | os.PathLike) -> bool:
    return location(value).startswith("s3://")


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a local directory or an ``s3://`` prefix."""
    base = location(base)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base).joinpath(*parts))


def write_text(target: str | os.PathLike, text: str) -> None:
    """A small text file at a local path (parents made) or an ``s3://`` URL (one PUT)."""
    target = location(target)
    if is_remote(target):
        from hyperscale.storage.s3 import put_text

        put_text(target, text)
        return
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(text)


@contextmanager
def staged_dir(target: str | os.PathLike, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local directory whose contents end up under ``target``: ``target`` itself when it is
    local; for an ``s3://`` prefix a temp directory, published there when the block succeeds
    (``hyperscale.storage.s3.publish_dir``: in a directory holding a file named in ``last``,
    that file goes up after the rest, and objects the upload did not write are removed)."""
    target = location(target)
    if not is_remote(target):
        Path(target).mkdir(parents=True, exist_ok=True)
        yield Path(target)
        return
    from hyperscale.storage.s3 import publish_dir

    with tempfile.TemporaryDirectory(prefix="hs-stage-") as tmp:
        yield Path(tmp)
        publish_dir(tmp, target, last)
