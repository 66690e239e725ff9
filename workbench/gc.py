"""The garbage collector: removes what nothing references and no running work can still use.

* store files no image row references (left by a killed ingest, or by a delete that found the
  store busy), under the exclusive store lock (``core.ingest.store_lock``), so no ingest is
  between "found the file" and "recorded it";
* ``tmp/ingest-*.part`` files of ingests killed mid-copy, under the same lock;
* staged uploads and predictions (``tmp/uploads/<id>``, ``tmp/predict/<id>``) that no queued
  or running job names.

Everything is also kept while younger than the grace period (default 6 h), so work started by
a process that does not take the lock is never hit. Runs at worker start
(``workbench.worker``) and as ``workbench gc [--grace-hours H] [--dry-run]``.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.ingest import store_lock
from storage import repositories as repo
from storage.db import get_sessionmaker
from storage.models import Job
from workbench.paths import PREDICT, UPLOADS, staging_dir
from workbench.settings import Settings, get_settings
from workbench.status import JobStatus

DEFAULT_GRACE_HOURS = 6.0
PART_GLOB = "ingest-*.part"  # core.ingest's temp files
_LIVE_JOB = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.LEGACY_WORKING)


@dataclass(frozen=True)
class Freed:
    files: int = 0
    bytes: int = 0

    def __add__(self, other: Freed) -> Freed:
        return Freed(self.files + other.files, self.bytes + other.bytes)


@dataclass(frozen=True)
class GcReport:
    store: Freed  # unreferenced store files
    partial: Freed  # .part files of interrupted ingests
    staged: Freed  # files of stale staged uploads / predictions
    staged_entries: int  # how many tmp/uploads/<id>, tmp/predict/<id> entries
    store_busy: bool  # an ingest held the store: store and .part files were not checked
    dry_run: bool
    grace_hours: float
    removed: list[str] = field(default_factory=list)  # paths relative to the data dir

    @property
    def total(self) -> Freed:
        return self.store + self.partial + self.staged


def _size(p: Path) -> int:
    try:
        return p.lstat().st_size
    except OSError:
        return 0


def _old(p: Path, cutoff: float) -> bool:
    try:
        return p.lstat().st_mtime <= cutoff
    except OSError:
        return False


def _unlink(p: Path) -> bool:
    try:
        p.unlink()
        return True
    except FileNotFoundError:
        return False


def _files_under(p: Path) -> Iterator[Path]:
    if p.is_dir() and not p.is_symlink():
        yield from (f for f in p.rglob("*") if f.is_symlink() or f.is_file())
    else:
        yield p


def _sweep_store(sf: sessionmaker[Session], s: Settings, cutoff: float, dry_run: bool,
                 removed: list[str]) -> Freed:
    """Call with the store lock held exclusively: the references read here are then final."""
    with sf() as session:
        used = repo.all_store_paths(session)
    freed = Freed()
    for p in sorted(_files_under(s.store_dir)) if s.store_dir.is_dir() else []:
        rel = p.relative_to(s.data_dir).as_posix()
        if rel in used or not _old(p, cutoff):
            continue
        n = _size(p)
        if dry_run or _unlink(p):
            freed += Freed(1, n)
            removed.append(rel)
    if not dry_run and s.store_dir.is_dir():
        for shard in s.store_dir.iterdir():  # store/ab/ left empty
            try:
                shard.rmdir()
            except OSError:
                pass
    return freed


def _sweep_parts(s: Settings, cutoff: float, dry_run: bool, removed: list[str]) -> Freed:
    freed = Freed()
    for p in sorted(s.tmp_dir.glob(PART_GLOB)) if s.tmp_dir.is_dir() else []:
        if not _old(p, cutoff):
            continue
        n = _size(p)
        if dry_run or _unlink(p):
            freed += Freed(1, n)
            removed.append(p.relative_to(s.data_dir).as_posix())
    return freed


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _in_use(sf: sessionmaker[Session], s: Settings, roots: list[Path]) -> set[Path]:
    """The staged entries (``tmp/<area>/<id>``) a queued or running job's payload names."""
    with sf() as session:
        payloads = session.scalars(select(Job.payload).where(Job.status.in_(_LIVE_JOB))).all()
    keep: set[Path] = set()
    for payload in payloads:
        for text in _strings(payload or {}):
            try:
                p = Path(text)
                p = (p if p.is_absolute() else s.data_dir / p).resolve()
            except (OSError, ValueError):  # not a path (a name, a NUL byte...)
                continue
            for root in roots:
                if root in p.parents:
                    keep.add(root / p.relative_to(root).parts[0])
    return keep


def _newest_mtime(entry: Path) -> float:
    times = [entry.lstat().st_mtime]
    times += [f.lstat().st_mtime for f in _files_under(entry) if f != entry]
    return max(times)


def _sweep_staged(sf: sessionmaker[Session], s: Settings, cutoff: float, dry_run: bool,
                  removed: list[str]) -> tuple[Freed, int]:
    roots = [staging_dir(s, area).resolve() for area in (UPLOADS, PREDICT)]
    keep = _in_use(sf, s, roots)
    freed, entries = Freed(), 0
    for root in roots:
        for entry in sorted(root.iterdir()) if root.is_dir() else []:
            try:
                if entry in keep or _newest_mtime(entry) > cutoff:
                    continue
                files = list(_files_under(entry))
                n = sum(_size(f) for f in files)
                if not dry_run:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            except OSError:  # vanished or unreadable meanwhile: leave it for the next pass
                continue
            entries += 1
            freed += Freed(len(files), n)
            removed.append(entry.relative_to(s.data_dir.resolve()).as_posix())
    return freed, entries


def collect_garbage(settings: Settings | None = None, *, grace_hours: float = DEFAULT_GRACE_HOURS,
                    dry_run: bool = False, lock_wait_s: float = 0.0) -> GcReport:
    """Remove unreferenced store files, stale ``.part`` files and stale staged uploads.

    ``lock_wait_s``: how long to wait for running ingests to release the store; if they do
    not, store and ``.part`` files are left for the next pass (``store_busy``).
    """
    if grace_hours < 0:
        raise ValueError("the grace period must be 0 hours or more")
    s = settings or get_settings()
    s.ensure_dirs()
    sf = get_sessionmaker(s.database_url)
    cutoff = time.time() - grace_hours * 3600
    removed: list[str] = []
    store = partial = Freed()
    with store_lock(s.data_dir, exclusive=True, wait_s=lock_wait_s) as got:
        if got:
            store = _sweep_store(sf, s, cutoff, dry_run, removed)
            partial = _sweep_parts(s, cutoff, dry_run, removed)
    staged, entries = _sweep_staged(sf, s, cutoff, dry_run, removed)
    return GcReport(store=store, partial=partial, staged=staged, staged_entries=entries,
                    store_busy=not got, dry_run=dry_run, grace_hours=grace_hours, removed=removed)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} bytes"  # pragma: no cover


def describe(r: GcReport) -> list[str]:
    """Plain-words lines for the CLI and the logs."""
    verb = "would remove" if r.dry_run else "removed"
    lines = [
        f"{verb} {r.store.files} unreferenced store file(s) ({human_bytes(r.store.bytes)}), "
        f"{r.partial.files} partial file(s) of interrupted ingests ({human_bytes(r.partial.bytes)}), "
        f"{r.staged_entries} stale staged upload(s) ({r.staged.files} file(s), {human_bytes(r.staged.bytes)})",
        f"{'would free' if r.dry_run else 'freed'} {human_bytes(r.total.bytes)} in all "
        f"(grace period {r.grace_hours:g} h: anything younger is kept)",
    ]
    if r.store_busy:
        lines.append("the image store is in use by a running ingest, so store files were not checked; "
                     "run `workbench gc` again when it has finished")
    return lines
