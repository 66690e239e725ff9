"""Delete and ingest, or two ingests, of the same images at the same time (threads with their own
sessions and lock handles, real SQLite, real files): no image row may end up pointing at a store
file that was removed."""
from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import png_bytes
from sqlalchemy import select

from storage.db import get_sessionmaker
from storage.models import Image
from workbench import datasets as svc
from workbench.settings import get_settings

ROUNDS = 100
SHARED = {f"{'ab'[i % 2]}/{i}.png": png_bytes(pattern=i + 1) for i in range(6)}


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _missing_files(data_dir: Path) -> list[str]:
    with get_sessionmaker(get_settings().database_url)() as s:
        paths = s.scalars(select(Image.store_path)).all()
    return [p for p in paths if not (data_dir / p).is_file()]


def _store_files(data_dir: Path) -> set[str]:
    return {p.relative_to(data_dir).as_posix() for p in (data_dir / "store").rglob("*") if p.is_file()}


def _in_threads(*fns: Callable[[], object]) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(len(fns))

    def run(fn: Callable[[], object]) -> None:
        start.wait()
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_delete_racing_ingest_of_shared_images_never_loses_files(data_dir: Path, tmp_path: Path) -> None:
    """Each round deletes the previous dataset while the next one (same images plus one of its
    own) is being ingested; the ingest pauses after its ``pause``-th file, mid-way, so the delete
    lands between "file found in the store" and "rows committed" (0: no pause)."""
    sources = [_folder(tmp_path / f"src{r}", {**SHARED, f"b/own{r}.png": png_bytes(pattern=100 + r)})
               for r in range(ROUNDS + 1)]
    svc.add_dataset(sources[0], "round-0")
    rng = random.Random(7)
    for r in range(1, ROUNDS + 1):
        pause = rng.randint(0, len(SHARED) + 1)
        deleted = threading.Event()

        def progress(done: int, _total: int, pause: int = pause, deleted: threading.Event = deleted) -> None:
            if done == pause:
                deleted.wait(0.05)  # give the delete its chance mid-ingest (it may have to wait)

        def delete(r: int = r, deleted: threading.Event = deleted) -> None:
            svc.delete_dataset(f"round-{r - 1}")
            deleted.set()

        def add(r: int = r, progress: Callable[[int, int], None] = progress) -> None:
            svc.add_dataset(sources[r], f"round-{r}", progress=progress)

        errors = _in_threads(delete, add)
        assert not errors, f"round {r}: {errors!r}"
        missing = _missing_files(data_dir)
        assert not missing, f"round {r} (pause {pause}): {len(missing)} image rows point at removed files"
    assert [d.name for d in svc.list_datasets()] == [f"round-{ROUNDS}"]
    # Nothing leaked either: the store holds exactly the files the last dataset uses.
    with get_sessionmaker(get_settings().database_url)() as s:
        assert _store_files(data_dir) == set(s.scalars(select(Image.store_path)).all())


@pytest.mark.parametrize("round_", range(5))
def test_failed_ingest_keeps_files_a_concurrent_ingest_found(data_dir: Path, tmp_path: Path, round_: int) -> None:
    """Ingest A stores new files then fails (one class only); ingest B of the same images found
    those files in the store meanwhile and commits: A's cleanup must not remove them."""
    own = {f"a/{i}.png": png_bytes(pattern=500 + 10 * round_ + i) for i in range(3)}
    one_class = _folder(tmp_path / "one", own)
    two_classes = _folder(tmp_path / "two", {**own, "b/x.png": png_bytes(pattern=499 - round_)})
    stored, checked = threading.Event(), threading.Event()
    failed = threading.Event()

    def a_progress(done: int, total: int) -> None:
        if done == total:
            stored.set()
            checked.wait(2)  # fail only once B has seen the files

    def b_progress(done: int, total: int) -> None:
        if done == len(own):
            checked.set()
            failed.wait(0.3)  # commit after A's cleanup, if A's cleanup does not wait for us

    def a() -> None:
        try:
            with pytest.raises(ValueError, match="need at least 2 classes"):
                svc.add_dataset(one_class, "a-one-class", progress=a_progress)
        finally:
            failed.set()

    def b() -> None:
        assert stored.wait(10)
        svc.add_dataset(two_classes, "b-two-classes", progress=b_progress)

    errors = _in_threads(a, b)
    assert not errors, errors
    assert _missing_files(data_dir) == []
    assert [d.name for d in svc.list_datasets()] == ["b-two-classes"]


def test_ids_are_not_reused_after_delete(data_dir: Path, tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", SHARED)
    first = svc.add_dataset(src, "first")
    second = svc.add_dataset(src, "second")
    svc.delete_dataset("second")
    third = svc.add_dataset(src, "third")
    assert first.id < second.id < third.id
