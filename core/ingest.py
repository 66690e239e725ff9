"""Ingest a labelled image dataset into the content-addressed store (pure: no DB).

Sources: a zip (streamed entry by entry, never extracted wholesale), a folder, or a
CSV/TSV manifest (columns path,label[,split][,group]) inside the zip/folder or passed
as ``csv=``. Without a manifest the class of an image is its parent folder's name
(at any depth); a folder named train/val/test just above the class folders is a
user-provided split.

Every accepted image is fully decoded (catching truncated files), hashed, and copied to
``data_dir/store/<sha[:2]>/<sha><ext>`` through a temp file in ``data_dir/tmp`` and an
atomic rename. Store file names are computed by us, never taken from the archive, so no
entry name can write outside the data dir.

Store files are shared between datasets (same content, same file), so storing and removing
them is coordinated by ``store_lock`` (``data_dir/store.lock``): an ingest holds it shared from
its first store-file check until its rows are committed (the ``commit`` callback), and whoever
removes store files (a failed ingest, a dataset delete, the garbage collector) holds it
exclusively while it re-checks references and unlinks.
"""
from __future__ import annotations

import csv as csvlib
import fcntl
import functools
import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import imagehash

from core.health import NEAR_DUP_THRESHOLD, build_health, duplicate_clusters, store_signatures
from core.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode
from core.splits import DEFAULT_FRACTIONS, SplitItem, assign_splits

ProgressFn = Callable[[int, int], None]
# Given store paths (relative to the data dir), return those some committed dataset references.
ReferencedFn = Callable[[Iterable[str]], set[str]]

STORE_LOCK = "store.lock"
# How long a failed ingest waits for the exclusive store lock to remove its own new files;
# past that (another ingest is running) the garbage collector removes them later.
DISCARD_WAIT_S = 2.0

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}
CLUTTER_DIRS = {"__MACOSX", ".ipynb_checkpoints", ".git", "$RECYCLE.BIN", ".Trashes", ".Spotlight-V100"}
CLUTTER_FILES = {".DS_Store", "Thumbs.db", "desktop.ini", "ehthumbs.db", "Icon\r"}
MANIFEST_SUFFIXES = {".csv", ".tsv"}
PATH_COLUMNS = ("path", "file", "filename", "image", "filepath")
LABEL_COLUMNS = ("label", "class", "category")
MAX_MANIFEST_BYTES = 64 * 2**20
_CHUNK = 1 << 20


class IngestError(ValueError):
    """Fatal ingest problem; ``str(err)`` is a user-facing message."""


@dataclass(frozen=True)
class IngestLimits:
    """Guards against hostile archives and images."""

    max_entries: int = 200_000  # zip entries / folder files
    max_total_bytes: int = 20 * 2**30  # total uncompressed bytes
    max_file_bytes: int = 512 * 2**20  # one file
    max_ratio: float = 200.0  # uncompressed / compressed, per entry...
    ratio_min_bytes: int = 2**20  # ...for entries at least this big (tiny files compress well legitimately)
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class ImageRecord:
    sha256: str
    store_path: str  # POSIX, relative to the data dir: store/ab/abcdef....png
    phash: str
    width: int
    height: int
    mode: str
    label: str
    split: str
    group: str | None
    original_name: str  # path inside the zip / folder
    user_split: str | None = None

    def as_row(self) -> dict[str, Any]:
        """Column values for the ``images`` table."""
        d = asdict(self)
        d.pop("user_split")
        return d


@dataclass
class SkippedFile:
    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class IngestResult:
    images: list[ImageRecord]
    skipped: list[SkippedFile]
    classes: list[str]
    health: dict[str, Any]
    split_config: dict[str, Any]
    new_files: list[Path] = field(default_factory=list)
    source: str = ""

    def rollback(self, keep: Callable[[Path], bool] | None = None) -> int:
        """Delete the store files this ingest created (unless ``keep(path)``); returns count.

        Not coordinated with other ingests: callers recording rows pass ``commit`` and
        ``referenced`` to ``ingest`` instead, which removes files under the store lock.
        """
        removed = _remove_files(self.new_files, keep)
        self.new_files = []
        return removed


def _remove_files(paths: list[Path], keep: Callable[[Path], bool] | None = None) -> int:
    removed = 0
    for p in paths:
        if keep is not None and keep(p):
            continue
        try:
            p.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        try:
            p.parent.rmdir()  # store/ab/ when it became empty
        except OSError:
            pass
    return removed


# --- the store lock ----------------------------------------------------------------------

# Why a flock and not a reference count in the database: it coordinates every process on this
# machine (UI, workers, CLI) through the one data dir, readers (ingests) share it while removers
# take it alone, and the kernel drops it when its process dies, so a kill -9 never leaves a stale
# lock or a count to repair. flock locks belong to the open file, so two threads of one process
# that each open the file exclude each other too.

def _flock(f: IO[bytes], mode: int, wait_s: float | None) -> bool:
    if wait_s is None:
        fcntl.flock(f, mode)
        return True
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


@contextmanager
def store_lock(data_dir: Path, *, exclusive: bool, wait_s: float | None = None) -> Iterator[bool]:
    """Hold ``data_dir/store.lock``: shared to add/reuse store files, exclusive to remove them.

    Yields whether the lock was taken: always True with ``wait_s=None`` (wait as long as it
    takes), else False when it stayed busy for ``wait_s`` seconds.
    """
    path = Path(data_dir) / STORE_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        got = _flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, wait_s)
        try:
            yield got
        finally:
            if got:
                fcntl.flock(f, fcntl.LOCK_UN)


def _discard_new_files(data_dir: Path, files: list[Path], referenced: ReferencedFn | None) -> int:
    """Remove store files a failed ingest created, unless a committed dataset uses them meanwhile.

    Under the exclusive lock no other ingest is between "file found" and "rows committed", so the
    reference check is final. If the lock stays busy the files stay: the GC removes them later.
    """
    if not files:
        return 0
    with store_lock(data_dir, exclusive=True, wait_s=DISCARD_WAIT_S) as got:
        if not got:
            return 0
        if referenced is not None:
            rel = {p: p.relative_to(data_dir).as_posix() for p in files}
            used = referenced(rel.values())
            files = [p for p in files if rel[p] not in used]
        return _remove_files(files)


# --- names shown to people -------------------------------------------------------------

# Characters that hide or reorder text on screen: C0/C1 controls, DEL, the bidi embeddings,
# overrides and isolates (U+202A-U+202E, U+2066-U+2069) and the LRM/RLM marks.
_UNSAFE_NAME_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_BIDI = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def unsafe_name_chars(text: str) -> list[str]:
    """The control and bidi characters in ``text``, as sorted ``U+XXXX`` codes (empty: none)."""
    return sorted({f"U+{ord(c):04X}" for c in _UNSAFE_NAME_CHARS.findall(text)})


def has_bidi_chars(text: str) -> bool:
    return _BIDI.search(text) is not None


def display_name(text: str) -> str:
    """``text`` with control and bidi characters written as visible escapes (\\x07, \\u202e).

    For messages and tables only: stored labels keep the exact name on disk so files map.
    """
    def esc(m: re.Match[str]) -> str:
        cp = ord(m.group(0))
        return f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}"

    return _UNSAFE_NAME_CHARS.sub(esc, text)


# --- sources ---------------------------------------------------------------------------

@dataclass
class _Entry:
    name: str  # normalised POSIX path relative to the source root
    size: int
    open: Callable[[], IO[bytes]]
    local_path: Path | None = None  # for folder sources: hash/decode in place


def _is_clutter(name: str) -> bool:
    parts = PurePosixPath(name).parts
    if any(p in CLUTTER_DIRS for p in parts[:-1]):
        return True
    base = parts[-1] if parts else ""
    return base in CLUTTER_FILES or base.startswith("._")


def _unsafe_reason(raw: str) -> str | None:
    name = raw.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in name.split("/"):
        return "has a '..' path component (path traversal)"
    if "\x00" in name:
        return "contains a NUL byte"
    return None


def _open_zip(source: Path) -> zipfile.ZipFile:
    with open(source, "rb") as f:
        magic = f.read(4)
    if not zipfile.is_zipfile(source):
        if magic.startswith(b"PK"):
            raise IngestError(
                f"zip file {source.name!r} is truncated or corrupt (its central directory is "
                "missing); upload it again"
            )
        raise IngestError(
            f"{source.name!r} is not a zip file; give a .zip archive, a folder, or a CSV manifest"
        )
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise IngestError(f"zip file {source.name!r} is truncated or corrupt: {e}") from e


def _scan_zip(zf: zipfile.ZipFile, limits: IngestLimits) -> tuple[list[_Entry], set[str], list[SkippedFile]]:
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise IngestError(
            f"zip has {len(infos):,} entries, over the limit of {limits.max_entries:,} (zip bomb?)"
        )
    entries: list[_Entry] = []
    dirs: set[str] = set()
    skipped: list[SkippedFile] = []
    total = 0
    # Validate everything before touching the disk: a hostile archive is refused whole.
    for info in infos:
        why = _unsafe_reason(info.filename)
        if why:
            raise IngestError(f"refusing unsafe zip: entry {info.filename!r} {why}")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise IngestError(f"refusing unsafe zip: entry {info.filename!r} is a symbolic link")
        total += info.file_size
        if total > limits.max_total_bytes:
            raise IngestError(
                f"zip expands to more than {limits.max_total_bytes:,} bytes (zip bomb?); "
                "split the dataset into smaller archives"
            )
        if info.file_size >= limits.ratio_min_bytes:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_ratio:
                raise IngestError(
                    f"zip entry {info.filename!r} has a compression ratio of {ratio:,.0f}:1, over "
                    f"the limit of {limits.max_ratio:g}:1 (zip bomb?)"
                )
    for info in infos:
        name = info.filename.replace("\\", "/").strip("/")
        if not name:
            continue
        if info.is_dir():
            dirs.add(name)
            continue
        if info.flag_bits & 0x1:
            skipped.append(SkippedFile(name, "encrypted zip entry (password-protected zips are not supported)"))
            continue
        entries.append(_Entry(name=name, size=info.file_size, open=functools.partial(zf.open, info)))
    return entries, dirs, skipped


def _file_opener(path: Path) -> Callable[[], IO[bytes]]:
    return lambda: open(path, "rb")


def _scan_folder(root: Path, limits: IngestLimits) -> tuple[list[_Entry], set[str], list[SkippedFile]]:
    entries: list[_Entry] = []
    dirs: set[str] = set()
    skipped: list[SkippedFile] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        rel_dir = d.relative_to(root).as_posix()
        if rel_dir != ".":
            dirs.add(rel_dir)
        for dn in list(dirnames):
            if (d / dn).is_symlink():
                skipped.append(SkippedFile(f"{dn}/" if rel_dir == "." else f"{rel_dir}/{dn}/",
                                           "symbolic link (not followed)"))
        for fn in sorted(filenames):
            p = d / fn
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                skipped.append(SkippedFile(rel, "symbolic link (not followed)"))
                continue
            if not p.is_file():
                skipped.append(SkippedFile(rel, "not a regular file"))
                continue
            entries.append(_Entry(name=rel, size=p.stat().st_size,
                                  open=_file_opener(p), local_path=p))
            if len(entries) > limits.max_entries:
                raise IngestError(
                    f"folder has more than {limits.max_entries:,} files, over the limit"
                )
    return entries, dirs, skipped


# Public names for the deploy-bundle reader (core/bundle.py): a bundle is opened with exactly
# the guards a dataset upload gets (entry count, sizes, ratio, zip-slip, symlinks).
open_zip = _open_zip
scan_zip = _scan_zip
scan_folder = _scan_folder


# --- manifests -------------------------------------------------------------------------

@dataclass
class _Planned:
    entry: _Entry
    label: str
    split: str | None
    group: str | None


def _parse_manifest(text: str, name: str, required: bool) -> list[dict[str, str]] | None:
    """Rows with keys path,label[,split][,group]; None if an auto-found CSV is not a manifest."""
    sample = text[:8192]
    if name.lower().endswith(".tsv"):
        delimiter = "\t"
    else:
        try:
            delimiter = csvlib.Sniffer().sniff(sample, delimiters=",;\t").delimiter
        except csvlib.Error:
            delimiter = ","
    reader = csvlib.DictReader(io.StringIO(text), delimiter=delimiter)
    header = {(h or "").strip().lower(): h for h in (reader.fieldnames or [])}
    path_col = next((header[c] for c in PATH_COLUMNS if c in header), None)
    label_col = next((header[c] for c in LABEL_COLUMNS if c in header), None)
    if path_col is None or label_col is None:
        if required:
            raise IngestError(
                f"CSV manifest {name!r} needs 'path' and 'label' columns; found "
                f"{list(reader.fieldnames or [])}"
            )
        return None
    split_col, group_col = header.get("split"), header.get("group")
    rows = []
    for row in reader:
        rows.append({
            "path": (row.get(path_col) or "").strip(),
            "label": (row.get(label_col) or "").strip(),
            "split": (row.get(split_col) or "").strip() if split_col else "",
            "group": (row.get(group_col) or "").strip() if group_col else "",
        })
    return rows


def _read_text(entry_or_path: _Entry | Path) -> str:
    if isinstance(entry_or_path, Path):
        if entry_or_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise IngestError(f"CSV manifest {entry_or_path.name!r} is larger than {MAX_MANIFEST_BYTES:,} bytes")
        data = entry_or_path.read_bytes()
    else:
        if entry_or_path.size > MAX_MANIFEST_BYTES:
            raise IngestError(f"CSV manifest {entry_or_path.name!r} is larger than {MAX_MANIFEST_BYTES:,} bytes")
        with entry_or_path.open() as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # Excel exports on Windows


def _plan_from_manifest(
    rows: list[dict[str, str]], base: str, entries: dict[str, _Entry], manifest_name: str,
) -> tuple[list[_Planned], list[SkippedFile], list[str]]:
    planned: list[_Planned] = []
    skipped: list[SkippedFile] = []
    missing: list[str] = []
    used: set[str] = set()
    for lineno, row in enumerate(rows, start=2):
        raw = row["path"].replace("\\", "/")
        if not raw:
            skipped.append(SkippedFile(f"{manifest_name}:{lineno}", "CSV row has an empty path"))
            continue
        if _unsafe_reason(raw):
            skipped.append(SkippedFile(raw, f"CSV path {_unsafe_reason(raw)}; must stay inside the dataset"))
            continue
        name = str(PurePosixPath(base, raw)) if base else str(PurePosixPath(raw))
        name = name.removeprefix("./")
        if not row["label"]:
            skipped.append(SkippedFile(name, f"CSV row {lineno} has an empty label"))
            continue
        split: str | None = None
        if row["split"]:
            split = SPLIT_ALIASES.get(row["split"].lower())
            if split is None:
                skipped.append(SkippedFile(name, f"CSV row {lineno} has unknown split {row['split']!r} "
                                                 "(use train, val or test)"))
                continue
        entry = entries.get(name)
        if entry is None:
            missing.append(name)
            skipped.append(SkippedFile(name, "listed in the CSV manifest but not found"))
            continue
        used.add(name)
        planned.append(_Planned(entry, row["label"], split, row["group"] or None))
    for name in sorted(set(entries) - used):
        skipped.append(SkippedFile(name, "not listed in the CSV manifest"))
    return planned, skipped, missing


def _plan_from_folders(entries: list[_Entry]) -> tuple[list[_Planned], list[SkippedFile]]:
    planned: list[_Planned] = []
    skipped: list[SkippedFile] = []
    for e in entries:
        parts = PurePosixPath(e.name).parts
        if len(parts) < 2:
            skipped.append(SkippedFile(e.name, "not inside a class folder"))
            continue
        split = SPLIT_ALIASES.get(parts[-3].lower()) if len(parts) >= 3 else None
        planned.append(_Planned(e, parts[-2], split, None))
    return planned, skipped


# --- storing one file ------------------------------------------------------------------

class _Budget:
    """Counts bytes actually read, because zip headers can lie about sizes."""

    def __init__(self, limits: IngestLimits) -> None:
        self.limits = limits
        self.total = 0

    def add(self, n: int) -> None:
        self.total += n
        if self.total > self.limits.max_total_bytes:
            raise IngestError(
                f"data expands to more than {self.limits.max_total_bytes:,} bytes (zip bomb?)"
            )


class _TooBig(Exception):
    pass


def _copy_hashing(src: IO[bytes], dst: IO[bytes] | None, limit: int, budget: _Budget) -> str:
    h = hashlib.sha256()
    n = 0
    while chunk := src.read(_CHUNK):
        n += len(chunk)
        if n > limit:
            raise _TooBig()
        budget.add(len(chunk))
        h.update(chunk)
        if dst is not None:
            dst.write(chunk)
    return h.hexdigest()


def _store_path(data_dir: Path, sha: str, ext: str) -> Path:
    return data_dir / "store" / sha[:2] / f"{sha}{ext}"


# --- main entry point ------------------------------------------------------------------

def ingest(
    source: Path,
    data_dir: Path,
    *,
    csv: Path | None = None,
    group_regex: str | None = None,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    limits: IngestLimits = IngestLimits(),
    progress: ProgressFn | None = None,
    near_threshold: int = NEAR_DUP_THRESHOLD,
    keep_near_duplicates_together: bool = True,
    input_size: int = 224,
    commit: Callable[[IngestResult], None] | None = None,
    referenced: ReferencedFn | None = None,
) -> IngestResult:
    """Ingest ``source`` into ``data_dir/store``; see the module docstring.

    Image ``store_path`` values are relative to ``data_dir``. ``commit(result)`` runs while
    the store lock is still held, so a caller that records the images there (the dataset
    service) never points at a file a concurrent delete removed. On any fatal error (in
    ``commit`` too) the files this call added to the store are removed, except those
    ``referenced`` says a committed dataset uses, and the error is raised.
    """
    source = Path(source)
    data_dir = Path(data_dir).resolve()
    if not source.exists():
        raise IngestError(f"source not found: {source}")
    regex: re.Pattern[str] | None = None
    if group_regex:
        try:
            regex = re.compile(group_regex)
        except re.error as e:
            raise IngestError(f"invalid group regex {group_regex!r}: {e}") from e
        if regex.groups < 1:
            raise IngestError(
                f"group regex {group_regex!r} needs a capture group, e.g. '^(patient\\d+)_'"
            )
    if csv is not None and not Path(csv).is_file():
        raise IngestError(f"CSV manifest not found: {csv}")

    tmp_dir = data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "store").mkdir(parents=True, exist_ok=True)

    zf: zipfile.ZipFile | None = None
    new_files: list[Path] = []
    held = ExitStack()  # the shared store lock, from the first store check to the commit
    try:
        manifest_path: Path | None = Path(csv) if csv is not None else None
        if source.is_dir():
            entries, dirs, skipped = _scan_folder(source, limits)
        elif source.suffix.lower() in MANIFEST_SUFFIXES:
            manifest_path = source
            entries, dirs, skipped = _scan_folder(source.parent, limits)
        else:
            zf = _open_zip(source)
            entries, dirs, skipped = _scan_zip(zf, limits)

        kept: list[_Entry] = []
        for entry in entries:
            if _is_clutter(entry.name):
                skipped.append(SkippedFile(entry.name, "OS clutter"))
            else:
                kept.append(entry)
        dirs = {d for d in dirs if not _is_clutter(d + "/x")}
        manifests = [e for e in kept if PurePosixPath(e.name).suffix.lower() in MANIFEST_SUFFIXES]
        by_name = {e.name: e for e in kept}

        missing: list[str] = []
        rows: list[dict[str, str]] | None = None
        base = ""
        manifest_name = ""
        if manifest_path is not None:
            manifest_name = manifest_path.name
            rows = _parse_manifest(_read_text(manifest_path), manifest_name, required=True)
            try:  # a manifest inside the scanned folder should not be listed as skipped
                by_name.pop(manifest_path.resolve().relative_to(
                    (source if source.is_dir() else source.parent).resolve()).as_posix(), None)
            except ValueError:
                pass
        elif manifests:
            depth = min(len(PurePosixPath(m.name).parts) for m in manifests)
            top = [m for m in manifests if len(PurePosixPath(m.name).parts) == depth]
            parsed = [(m, _parse_manifest(_read_text(m), m.name, required=False)) for m in top]
            valid = [(m, r) for m, r in parsed if r is not None]
            if len(valid) > 1:
                raise IngestError(
                    "several CSV manifests found (" + ", ".join(m.name for m, _ in valid)
                    + "); pass the one to use with --csv"
                )
            if valid:
                m, rows = valid[0]
                manifest_name = m.name
                base = str(PurePosixPath(m.name).parent).removeprefix(".")
                by_name.pop(m.name, None)
        for m in manifests:  # other CSVs are not images
            if m.name in by_name and (rows is None or m.name != manifest_name):
                by_name.pop(m.name)
                skipped.append(SkippedFile(m.name, "CSV file that is not the manifest (ignored)"))

        if rows is not None:
            planned, more, missing = _plan_from_manifest(rows, base, by_name, manifest_name)
        else:
            planned, more = _plan_from_folders(list(by_name.values()))
        skipped.extend(more)
        has_split_folders = any(p.split for p in planned)

        records: list[ImageRecord] = []
        budget = _Budget(limits)
        held.enter_context(store_lock(data_dir, exclusive=False))
        unmatched_regex = 0
        total = len(planned)
        for done, p in enumerate(planned, start=1):
            rec = _ingest_one(p, data_dir, tmp_dir, limits, budget, skipped, new_files)
            if rec is not None:
                if has_split_folders and p.split is None:
                    skipped.append(SkippedFile(p.entry.name, "image outside the train/val/test folders"))
                    rec = None
            if rec is not None:
                group = p.group
                if group is None and regex is not None:
                    found = regex.search(PurePosixPath(p.entry.name).name)
                    if found and found.group(1):
                        group = found.group(1)
                    else:
                        unmatched_regex += 1
                rec.label, rec.user_split, rec.group = p.label, p.split, group
                records.append(rec)
            if progress is not None:
                progress(done, total)

        if not records:
            reasons = Counter(s.reason for s in skipped).most_common(3)
            detail = "; ".join(f"{n}x {r}" for r, n in reasons)
            raise IngestError(
                f"no usable images found in {source.name!r}"
                + (f" ({len(skipped)} files skipped: {detail})" if skipped else " (it is empty)")
            )
        classes = sorted({r.label for r in records})
        if len(classes) < 2:
            raise IngestError(
                f"need at least 2 classes, found only {classes[0]!r} ({len(records)} images); "
                "put each class in its own folder, or give a CSV with a label column"
            )

        # Pixels confirm hash matches (read once, shared by the split and the report).
        signatures = store_signatures(data_dir)
        clusters = duplicate_clusters(
            records, near_threshold=near_threshold if keep_near_duplicates_together else None,
            signatures=signatures,
        )
        items = [
            SplitItem(label=r.label, group=r.group, cluster=c, user_split=r.user_split)
            for r, c in zip(records, clusters)
        ]
        try:
            split = assign_splits(items, fractions=split_fractions, seed=seed)
        except ValueError as e:
            raise IngestError(str(e)) from e
        for r, s in zip(records, split.splits):
            r.split = s
        split_config = dict(split.config)
        split_config["grouping"] = {
            "csv_groups": bool(rows is not None and any(p.group for p in planned)),
            "group_regex": group_regex,
            "num_groups": len({r.group for r in records if r.group is not None}),
            "regex_unmatched": unmatched_regex,
            "duplicates_kept_together": "exact+near" if keep_near_duplicates_together else "exact",
            "near_threshold": near_threshold,
        }
        extra = list(split.warnings)
        # Class names keep the exact folder name / CSV label (so files and labels map back);
        # names with control or bidi characters are reported, escaped, rather than refused,
        # so an odd folder name never costs the user their images.
        unsafe = [c for c in classes if unsafe_name_chars(c)]
        for c in unsafe:
            extra.append(
                f"class name '{display_name(c)}' contains invisible control or text-direction "
                f"characters ({', '.join(unsafe_name_chars(c))}), shown escaped here; the class keeps "
                "the exact name on disk, but renaming its folder or label is safer"
            )
        if regex is not None and unmatched_regex:
            extra.append(
                f"group regex matched no group in {unmatched_regex} file name(s); each of those "
                "images is its own group"
            )

        image_dirs = {str(PurePosixPath(r.original_name).parent) for r in records}
        all_dirs = set(dirs)
        for entry in kept:
            parent = PurePosixPath(entry.name).parent
            while str(parent) != ".":
                all_dirs.add(str(parent))
                parent = parent.parent
        empty = sorted(
            d for d in all_dirs
            if rows is None
            and not any(o.startswith(d + "/") for o in all_dirs)  # leaf folders only
            and d not in image_dirs
        )
        health = build_health(
            records, skipped=[s.as_dict() for s in skipped], empty_class_folders=empty,
            missing_from_csv=missing, input_size=input_size, near_threshold=near_threshold,
            extra_warnings=extra, signatures=signatures,
        )
        # Warnings are messages: any class or folder name they quote is shown escaped.
        health["warnings"] = [display_name(w) for w in health.get("warnings", [])]
        if unsafe:
            health["unsafe_class_names"] = [
                {"display_name": display_name(c), "characters": unsafe_name_chars(c)} for c in unsafe
            ]
        result = IngestResult(
            images=records, skipped=skipped, classes=classes, health=health,
            split_config=split_config, new_files=new_files, source=str(source),
        )
        if commit is not None:
            commit(result)
        return result
    except BaseException:
        held.close()  # removing files needs the lock exclusively
        _discard_new_files(data_dir, new_files, referenced)
        raise
    finally:
        held.close()
        if zf is not None:
            zf.close()


def _ingest_one(
    p: _Planned,
    data_dir: Path,
    tmp_dir: Path,
    limits: IngestLimits,
    budget: _Budget,
    skipped: list[SkippedFile],
    new_files: list[Path],
) -> ImageRecord | None:
    e = p.entry
    tmp_path: Path | None = None
    try:
        if e.size > limits.max_file_bytes:
            skipped.append(SkippedFile(e.name, f"file is larger than {limits.max_file_bytes:,} bytes"))
            return None
        if e.local_path is not None:
            with e.open() as f:
                sha = _copy_hashing(f, None, limits.max_file_bytes, budget)
            decode_from = e.local_path
        else:
            fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="ingest-", suffix=".part")
            tmp_path = Path(tmp_name)
            with os.fdopen(fd, "wb") as out, e.open() as f:
                sha = _copy_hashing(f, out, limits.max_file_bytes, budget)
            decode_from = tmp_path
        try:
            img = decode(decode_from, max_pixels=limits.max_pixels)
        except ImageDecodeError as err:
            skipped.append(SkippedFile(e.name, str(err)))
            return None
        phash = str(imagehash.phash(img.image))
        dest = _store_path(data_dir, sha, img.ext)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            if tmp_path is None:
                fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="ingest-", suffix=".part")
                os.close(fd)
                tmp_path = Path(tmp_name)
                shutil.copyfile(decode_from, tmp_path)
            os.replace(tmp_path, dest)  # atomic: readers never see a half-written file
            tmp_path = None
            new_files.append(dest)
        return ImageRecord(
            sha256=sha, store_path=dest.relative_to(data_dir).as_posix(), phash=phash,
            width=img.width, height=img.height, mode=img.mode, label=p.label, split="",
            group=None, original_name=e.name,
        )
    except _TooBig:
        skipped.append(SkippedFile(e.name, f"file is larger than {limits.max_file_bytes:,} bytes"))
        return None
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        skipped.append(SkippedFile(e.name, f"corrupt zip entry: {err}"))
        return None
    except (PermissionError, IsADirectoryError) as err:
        skipped.append(SkippedFile(e.name, f"unreadable file: {err.strerror or err}"))
        return None
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def iter_store_files(data_dir: Path) -> Iterator[Path]:
    """All files in the store (for garbage collection / tests)."""
    yield from (p for p in (Path(data_dir) / "store").rglob("*") if p.is_file())
