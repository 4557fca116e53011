"""Folders graft writes (a run, a comparison, the demo): graft removes only what it wrote.

Every such folder gets a manifest, `graft-manifest.json`, before anything else is written into it:

    {"graft_folder": "run", "run_id": "...", "created": "...", "graft_version": "...",
     "files": ["config.json", "split.json", ..., "bundle", "checkpoint", "report.html"]}

`files` names everything the folder's writer may put there, recorded before it is written, so a
name in it was written by graft or not at all. The rules, for `claim_folder`:

- a missing or empty folder is claimed (created, manifest written);
- a folder with a manifest holds an earlier run: refused unless `overwrite` (its listed files are
  removed, then a new manifest is written, before the new run writes anything, so a kill never
  leaves two runs mixed) or `resume` (the run continues under its own manifest);
- any other non-empty folder is refused, naming it, and nothing in it is touched: graft cannot
  prove it wrote those files (a data folder, another program's output, a run of an older graft);
- a file where the folder should be, a file among its parents, or a folder graft may not write is
  refused with the path named.

`remove_owned` removes exactly the manifest's names (and the hidden temporaries of those names
that a killed atomic write left); a listed folder that has a manifest of its own (a comparison's
run folders) is removed through that manifest, so what a user put inside it stays.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from graft import __version__
from graft.atomic import atomic_dir, output_error, write_json
from graft.errors import ConfigError, OutputError

MANIFEST_NAME = "graft-manifest.json"
# What a run writes into its folder (graft.run, graft.training.checkpoint, graft.report).
RUN_FILES = (
    "config.json", "split.json", "history.jsonl", "checkpoint", "val_predictions.json",
    "metrics.json", "bundle", "forgetting.json", "report.html", "data_check.csv", "data_check.json",
)
# Files an operating system's file manager leaves in a folder it merely showed.
_SYSTEM_LITTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.(tmp|old)$")


@dataclass
class OwnedFolder:
    """A folder graft claimed: its manifest's run id and the names graft may write in it."""

    path: Path
    kind: str
    run_id: str
    files: list[str] = field(default_factory=list)

    def record(self, names: Iterable[str]) -> None:
        """Add `names` to the manifest before they are written (the manifest is rewritten whole)."""
        new = [name for name in names if name not in self.files]
        if new:
            self.files.extend(new)
            _write_manifest(self)


def read_manifest(folder: str | Path) -> OwnedFolder | None:
    """The manifest of `folder`, or None where there is none (or it is not graft's)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("graft_folder"), str) or not isinstance(data.get("files"), list):
        return None
    files = [name for name in data["files"] if isinstance(name, str) and _plain_name(name)]
    return OwnedFolder(Path(folder), data["graft_folder"], str(data.get("run_id", "")), files)


def check_folder(path: str | Path, *, kind: str, overwrite: bool = False, resume: bool = False, option: str = "--out") -> None:
    """Refuse (`OutputError`) where `claim_folder` would; reads only, writes nothing."""
    if overwrite and resume:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it: choose one")
    folder = Path(path)
    _check_place(folder, option)
    if not folder.exists():
        return
    owned = read_manifest(folder)
    if owned is None:
        if resume:
            raise OutputError(
                f"{option} {folder}: no graft run to resume here (no {MANIFEST_NAME}); "
                "check the folder, or train without --resume"
            )
        foreign = _foreign_entries(folder)
        if foreign:
            listing = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputError(
                f"{option} {folder}: the folder is not empty ({listing}) and has no {MANIFEST_NAME}, so graft did "
                f"not write it and will neither write into it nor delete anything in it"
                + (" (--overwrite only replaces what graft wrote)" if overwrite else "")
                + f"; choose a new or empty folder, e.g. {option} {_free_sibling(folder)}"
            )
        return
    if resume or overwrite:
        return
    what = "a graft run" if owned.kind == "run" else f"a graft {owned.kind} folder"
    resume_hint = ", --resume to continue it" if kind == "run" and owned.kind == "run" else ""
    raise OutputError(
        f"{option} {folder} holds {what} already (run id {owned.run_id or 'unknown'}); pass --overwrite to "
        f"replace it{resume_hint}, or choose a new folder, e.g. {option} {_free_sibling(folder)}"
    )


def claim_folder(
    path: str | Path,
    *,
    kind: str,
    files: Sequence[str],
    overwrite: bool = False,
    resume: bool = False,
    option: str = "--out",
) -> OwnedFolder:
    """Make `path` graft's folder for a new `kind` run (see the module's rules); returns it.

    With `overwrite`, the earlier run's files are removed before the manifest of the new one is
    written; with `resume`, the existing manifest is kept and `files` are added to it.
    """
    check_folder(path, kind=kind, overwrite=overwrite, resume=resume, option=option)
    folder = Path(path)
    with _writing(folder, option):
        owned = read_manifest(folder) if resume else None
        if owned is not None:
            owned.record(files)
            return owned
        if read_manifest(folder) is not None:
            remove_owned(folder, keep_folder=True)
        folder.mkdir(parents=True, exist_ok=True)
        owned = OwnedFolder(folder, kind, uuid.uuid4().hex[:12], list(dict.fromkeys(files)))
        _write_manifest(owned)
        return owned


def remove_owned(path: str | Path, *, keep_folder: bool = False) -> None:
    """Remove what the manifest of `path` lists, then the manifest (and the folder, if now empty)."""
    folder = Path(path)
    owned = read_manifest(folder)
    if owned is None:
        return
    listed = set(owned.files)
    for entry in sorted(folder.iterdir()):
        temporary = _TEMPORARY.match(entry.name)
        if entry.name in listed or (temporary and temporary["name"] in listed | {MANIFEST_NAME}):
            _remove_entry(entry)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    if not keep_folder:
        try:
            folder.rmdir()
        except OSError:
            pass  # something graft did not write is still in it: it stays, and so does the folder


def may_replace(target: str | Path) -> bool:
    """Whether graft wrote `target` (so may replace it): its folder's manifest lists its name."""
    target = Path(target)
    owned = read_manifest(target.parent)
    return owned is not None and target.name in owned.files


@contextlib.contextmanager
def replace_dir(target: str | Path) -> Iterator[Path]:
    """`graft.atomic.atomic_dir` for a folder that may already exist: replaced only if graft wrote it.

    An existing `target` is replaced only where its folder's manifest lists it (`may_replace`); any
    other is refused with `OutputError`, before any work.
    """
    target = Path(target)
    if target.exists() and not may_replace(target):
        raise OutputError(
            f"{target} exists and graft did not write it (no graft manifest beside it lists it), so it is "
            "not replaced; move it away or write somewhere else"
        )
    with atomic_dir(target) as temporary:
        yield temporary


def check_writable_folder(path: str | Path, option: str) -> None:
    """Refuse (`OutputError`) a folder option that names a file, lies under a file, or cannot be created."""
    folder = Path(path)
    _check_place(folder, option)
    with _writing(folder, option):
        folder.mkdir(parents=True, exist_ok=True)


# --- helpers ------------------------------------------------------------------------------------


def _check_place(folder: Path, option: str) -> None:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None:
        return
    if existing == folder and not folder.is_dir():
        raise OutputError(f"{option} {folder} is a file, not a folder; choose a folder name (it is created if missing)")
    if not existing.is_dir():
        raise OutputError(f"{option} {folder}: {existing} is a file, so no folder can be made under it; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {folder}: {existing} is not writable; give yourself write permission there, or choose another folder")


class _writing:
    """Turns an `OSError` raised inside into `output_error(path, ...)`."""

    def __init__(self, path: Path, option: str | None) -> None:
        self.path, self.option = path, option

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise output_error(getattr(error, "filename", None) or self.path, error, self.option) from error
        return False


def _write_manifest(owned: OwnedFolder) -> None:

    write_json(owned.path / MANIFEST_NAME, {
        "graft_folder": owned.kind,
        "run_id": owned.run_id,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "graft_version": __version__,
        "files": owned.files,
    })


def _remove_entry(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        if read_manifest(entry) is not None:
            remove_owned(entry)  # a run folder inside: only what its own manifest lists
            return
        # Renamed first so a kill mid-delete leaves a hidden temporary, not half a folder by its name.
        aside = entry.with_name(f".{entry.name.lstrip('.')}.{uuid.uuid4().hex[:8]}.old") if not _TEMPORARY.match(entry.name) else entry
        if aside != entry:
            os.replace(entry, aside)
        shutil.rmtree(aside)
    else:
        entry.unlink(missing_ok=True)


def _foreign_entries(folder: Path) -> list[str]:
    def ignorable(name: str) -> bool:  # a file manager's litter, or a manifest's write cut short by a kill
        temporary = _TEMPORARY.match(name)
        return name in _SYSTEM_LITTER or (temporary is not None and temporary["name"] == MANIFEST_NAME)

    return sorted(entry.name for entry in folder.iterdir() if not ignorable(entry.name))


def _free_sibling(folder: Path) -> Path:
    number = 2
    while (candidate := folder.with_name(f"{folder.name}-{number}")).exists():
        number += 1
    return candidate


def _plain_name(name: str) -> bool:
    # A manifest names entries of its own folder only: never a path that leads elsewhere.
    return name not in ("", ".", "..", MANIFEST_NAME) and "/" not in name and "\\" not in name
