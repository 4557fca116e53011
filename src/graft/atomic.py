"""Atomic writes: a file or a folder appears whole, or not at all.

Everything graft writes into a run folder goes through here. The content is written under a
temporary name in the same folder, flushed to disk, then renamed over the target (a rename is
atomic on POSIX file systems), so a crash or a SIGKILL leaves either the old file or the new one.
A write that fails (disk full, no permission) raises `OutputError` naming the target; the
temporary is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from graft.errors import GraftError, OutputError


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is fsynced and renamed to `target`."""
    target = Path(target)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with _failed_writes_named(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            yield temporary
            if temporary.is_file():
                with temporary.open("rb") as handle:
                    os.fsync(handle.fileno())
            os.replace(temporary, target)
            _fsync_dir(target.parent)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink()


def write_text(target: Path, text: str) -> None:
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(target: Path, data: Any) -> None:
    """Write `data` as JSON; nan and inf, which JSON cannot hold, raise `GraftError` instead."""
    try:
        text = json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=False)
    except ValueError:

        raise GraftError(f"{target}: not written, {_first_non_finite(data)} is not a finite number and JSON has no nan or inf") from None
    write_text(target, text + "\n")


def _first_non_finite(data: Any, where: str = "") -> str | None:
    """Where the first nan or inf in `data` is (`['history'][2]['val_loss']`), for the message."""
    if isinstance(data, float) and not math.isfinite(data):
        return where or "the value"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        found = _first_non_finite(value, f"{where}[{key!r}]")
        if found:
            return found
    return None


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `target` (an older one is removed first).

    Whether `target` may be replaced at all is the caller's question: `graft.run_folder.replace_dir`
    asks the folder's manifest first.
    """
    target = Path(target)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary.mkdir()
    except OSError as error:
        raise _output_error(target, error) from error
    try:
        with _failed_writes_named(target):
            yield temporary
            for path in temporary.iterdir():
                if path.is_file():
                    with path.open("rb") as handle:
                        os.fsync(handle.fileno())
            if target.exists():
                # Move the old one aside first so that a crash between the two renames leaves a
                # complete bundle under one of the two names, never a mixture.
                old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
                os.replace(target, old)
                os.replace(temporary, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(temporary, target)
            _fsync_dir(target.parent)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


@contextlib.contextmanager
def _failed_writes_named(target: Path) -> Iterator[None]:
    """A write that fails for want of room or permission becomes an `OutputError` naming `target`."""
    try:
        yield
    except Exception as error:
        failed_write = _output_error(target, error)
        if failed_write is error:
            raise
        raise failed_write from error


def _output_error(target: Path, error: Exception) -> Exception:
    """A failed write as `OutputError` naming `target`; any other exception unchanged."""
    if isinstance(error, OutputError):
        return error
    if not isinstance(error, OSError):
        # safetensors (Rust) reports a failed write as "... I/O error: ... (os error 28)".
        found = re.search(r"\(os error (\d+)\)", str(error))
        if found is None:
            return error
        error = OSError(int(found[1]), os.strerror(int(found[1])))

    return output_error(target, error)


def output_error(path: str | Path, error: OSError, option: str | None = None) -> OutputError:
    """An `OSError` met writing `path`, as one `OutputError` that names it and says what to do."""
    where = f"{option} {path}" if option else str(path)
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some disk space, or write elsewhere"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "give yourself write permission there, or choose another folder"
    elif error.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        fix = "a file stands where a folder is needed (or the reverse); choose another path"
    else:
        fix = "check the path"
    return OutputError(
        f"{where}: cannot write ({reason}); the files graft wrote before are whole, since each is "
        f"written under a temporary name and renamed into place; {fix}"
    )


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
