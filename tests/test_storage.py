"""Schema, migrations, SQLite settings, cascades, repositories and artifact checks.

On real SQLite, and on a real PostgreSQL database when WORKBENCH_TEST_DATABASE_URL is set
(``db_url``); the tests of SQLite's own settings run on SQLite only."""
from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import fresh_database, on_postgresql, sqlite_only
from sqlalchemy import insert, inspect, select, text
from sqlalchemy.exc import IntegrityError

from storage import repositories as repo
from storage.artifacts import ArtifactError, register_artifact, verify_artifact
from storage.db import downgrade, get_sessionmaker, init_db, make_engine, upgrade
from storage.models import (
    Artifact,
    Base,
    Benchmark,
    Dataset,
    Evaluation,
    Image,
    Job,
    Run,
    RunEvent,
    RunMetric,
    Search,
    utcnow,
)
from workbench.status import RunStatus

HEAD = "0006_search_state"
TABLES = {"datasets", "images", "runs", "run_metrics", "run_events", "evaluations",
          "artifacts", "benchmarks", "jobs", "dataset_versions", "searches", "workers"}


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'wb.db'}"


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL database on the test server."""
    with fresh_database() as url:
        yield url or _url(tmp_path)


def _tables(url: str) -> set[str]:
    eng = make_engine(url)
    try:
        return set(inspect(eng).get_table_names()) - {"workbench_alembic_version"}
    finally:
        eng.dispose()


def test_upgrade_from_empty_creates_schema_matching_models(db_url: str) -> None:
    url = db_url
    init_db(url)
    assert _tables(url) == TABLES
    eng = make_engine(url)
    with eng.connect() as conn:
        opts = {"compare_type": True, "version_table": "workbench_alembic_version"}
        diff = compare_metadata(MigrationContext.configure(conn, opts=opts), Base.metadata)
        assert conn.execute(text("SELECT version_num FROM workbench_alembic_version")).scalar() == HEAD
    eng.dispose()
    assert diff == [], f"models and migrations drifted: {diff}"


def test_upgrade_downgrade_upgrade_roundtrip(db_url: str) -> None:
    url = db_url
    upgrade(url)
    downgrade(url, "base")
    assert _tables(url) == set()
    upgrade(url)
    assert _tables(url) == TABLES
    upgrade(url)  # idempotent at head


@sqlite_only
def test_sqlite_pragmas_on_every_connection(tmp_path: Path) -> None:
    sm = init_db(_url(tmp_path))
    with sm() as s:
        assert s.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert s.execute(text("PRAGMA busy_timeout")).scalar() >= 1000


@pytest.mark.skipif(not on_postgresql(), reason="PostgreSQL's engine options (WORKBENCH_TEST_DATABASE_URL unset)")
def test_postgresql_engine_options_and_non_finite_json(db_url: str) -> None:
    sm = init_db(db_url)
    assert sm.kw["bind"].pool._pre_ping  # a connection the server dropped is replaced, not used
    with sm.begin() as s:
        ds = repo.add_dataset(s, name="n", source="x", classes=[], health={"score": float("nan")},
                              split_config={"ratio": [0.5, float("inf")]}, skipped=[], num_images=0)
    with sm() as s:  # json refuses NaN/Infinity: stored as null rather than failing the write
        got = s.get(Dataset, ds.id)
        assert got is not None and got.health == {"score": None} and got.split_config == {"ratio": [0.5, None]}


@sqlite_only
def test_in_memory_database_works(tmp_path: Path) -> None:
    sm = init_db("sqlite://")
    with sm.begin() as s:
        s.add(Dataset(name="m", source="x"))
    with sm() as s:
        assert repo.get_dataset_by_name(s, "m") is not None


@sqlite_only  # about the cache, not the backend: SQLite files are the cheap way to have two URLs
def test_get_sessionmaker_cached_per_url(tmp_path: Path) -> None:
    a = get_sessionmaker(f"sqlite:///{tmp_path / 'a.db'}")
    assert get_sessionmaker(f"sqlite:///{tmp_path / 'a.db'}") is a
    assert get_sessionmaker(f"sqlite:///{tmp_path / 'b.db'}") is not a


def _populate(sm) -> int:  # type: ignore[no-untyped-def]
    with sm.begin() as s:
        ds = repo.add_dataset(s, name="d", source="src", classes=["a", "b"], health={"ok": 1},
                              split_config={}, skipped=[], num_images=2)
        repo.add_images(s, ds.id, [
            dict(store_path="store/aa/x.png", sha256="a" * 64, phash="0" * 16, width=1, height=1,
                 mode="RGB", label=lbl, split="train", group=None, original_name=f"{lbl}/x.png")
            for lbl in ("a", "b")
        ])
        # Core insert naming only the first revision's columns: this also fills databases made by
        # older revisions, which lack the columns added since (runs.search_id...).
        run_id = s.execute(insert(Run.__table__).values(
            dataset_id=ds.id, variant="efficientnet_b0", resolution=224, preset="fast", status="queued", config={},
            created_at=utcnow(), cancel_requested=False)).inserted_primary_key[0]
        s.add_all([
            RunMetric(run_id=run_id, epoch=1, phase="val", metrics={"acc": 0.5}),
            RunEvent(run_id=run_id, message="started"),
            Evaluation(run_id=run_id, split="test", metrics={"acc": 0.5}),
        ])
        # Only the columns every revision has (the model may have more than an old database).
        s.execute(insert(Job).values(kind="train", status="queued", run_id=run_id, payload={}, created_at=utcnow()))
        s.add_all([
            Artifact(run_id=run_id, kind="checkpoint", path="runs/1/best.pt", sha256="b" * 64, bytes=3),
            Artifact(dataset_id=ds.id, kind="report", path="r.json", sha256="c" * 64, bytes=3),
            Benchmark(kind="latency", key="k", machine="m", result={"ms": 1.0}),
        ])
        return ds.id


def test_deleting_a_dataset_cascades_to_every_child_table(db_url: str) -> None:
    sm = init_db(db_url)
    ds_id = _populate(sm)
    with sm.begin() as s:
        repo.delete_dataset(s, ds_id)
    with sm() as s:
        for model in (Dataset, Image, Run, RunMetric, RunEvent, Evaluation, Job, Artifact):
            assert s.scalars(select(model)).all() == [], model.__tablename__
        assert len(s.scalars(select(Benchmark)).all()) == 1  # not dataset-owned


def test_run_metrics_unique_per_epoch_and_phase(db_url: str) -> None:
    sm = init_db(db_url)
    _populate(sm)
    with pytest.raises(IntegrityError):
        with sm.begin() as s:
            run_id = s.scalars(select(Run.id)).one()
            s.add(RunMetric(run_id=run_id, epoch=1, phase="val", metrics={}))


def test_foreign_keys_enforced(db_url: str) -> None:
    sm = init_db(db_url)
    with pytest.raises(IntegrityError):
        with sm.begin() as s:
            s.add(Run(dataset_id=999, variant="v", resolution=224, preset="p"))


def test_timestamps_are_utc_aware_and_defaults_apply(db_url: str) -> None:
    sm = init_db(db_url)
    _populate(sm)
    with sm() as s:
        ds = repo.get_dataset_by_name(s, "d")
        assert ds is not None and ds.created_at.tzinfo == UTC
        run = s.scalars(select(Run)).one()
        assert run.status == "queued" and run.cancel_requested is False
        assert run.created_at.tzinfo == UTC
        assert repo.get_dataset_by_name_or_id(s, str(ds.id)) is ds
        assert [i.label for i in repo.images_for_dataset(s, ds.id, "train")] == ["a", "b"]
        assert repo.split_counts(s, ds.id) == {"train": {"a": 1, "b": 1}}
        assert repo.store_paths_used_elsewhere(s, ["store/aa/x.png"], exclude_dataset_id=ds.id) == set()
        assert repo.store_paths_used_elsewhere(s, ["store/aa/x.png"]) == {"store/aa/x.png"}


def test_artifact_register_and_verify(tmp_path: Path, db_url: str) -> None:
    data = tmp_path / "data"
    (data / "runs" / "1").mkdir(parents=True)
    f = data / "runs" / "1" / "model.onnx"
    f.write_bytes(b"onnx-bytes")
    sm = init_db(db_url)
    with sm.begin() as s:
        art = register_artifact(s, f, data, kind="onnx_fp32", meta={"opset": 17})
        assert art.path == "runs/1/model.onnx" and art.bytes == 10
    assert verify_artifact(art, data) == f.resolve()

    f.write_bytes(b"onnx-bytez")  # same size, different content
    with pytest.raises(ArtifactError, match="altered.*sha256"):
        verify_artifact(art, data)
    f.write_bytes(b"short")
    with pytest.raises(ArtifactError, match="altered.*5 bytes, expected 10"):
        verify_artifact(art, data)
    f.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        verify_artifact(art, data)

    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"x")
    with sm.begin() as s, pytest.raises(ArtifactError, match="not inside the data dir"):
        register_artifact(s, outside, data, kind="plot")
    escaped = Artifact(id=9, kind="plot", path="../elsewhere.bin", sha256="x", bytes=1)
    with pytest.raises(ArtifactError, match="escapes the data dir"):
        verify_artifact(escaped, data)


# --- ids are never reused (0002_autoincrement_ids) -------------------------------------

_CHILDREN = (Dataset, Image, Run, RunMetric, RunEvent, Evaluation, Job, Artifact, Benchmark)


Snapshot = dict[str, tuple[list[str], list[tuple]]]


def _snapshot_rows(sm, like: Snapshot | None = None) -> Snapshot:  # type: ignore[no-untyped-def]
    """Every row of every child table, in the columns the database has (an older revision has fewer),
    or in the columns of an earlier snapshot ``like`` (to compare across a migration)."""
    with sm() as s:
        out = {}
        for m in _CHILDREN:
            have = {c["name"] for c in inspect(s.connection()).get_columns(m.__tablename__)}
            names = like[m.__tablename__][0] if like else [c.name for c in m.__table__.c if c.name in have]
            rows = s.execute(select(*[m.__table__.c[n] for n in names])).all()
            out[m.__tablename__] = (names, sorted(tuple(r) for r in rows))
        return out


def _new_dataset_and_run(sm, name: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    with sm.begin() as s:
        ds = repo.add_dataset(s, name=name, source="src", classes=["a", "b"], health={},
                              split_config={}, skipped=[], num_images=0)
        run = Run(dataset_id=ds.id, variant="efficientnet_b0", resolution=224, preset="fast", status=RunStatus.QUEUED)
        s.add(run)
        s.flush()
        return ds.id, run.id


def _assert_ids_not_reused(sm) -> None:  # type: ignore[no-untyped-def]
    ds_id, run_id = _new_dataset_and_run(sm, "newest")
    with sm.begin() as s:  # delete the newest dataset (and its run): their ids are the highest
        repo.delete_dataset(s, ds_id)
    again_ds, again_run = _new_dataset_and_run(sm, "after-delete")
    assert again_ds > ds_id and again_run > run_id


@pytest.mark.parametrize("start", ["empty", "0001_initial"])
def test_migration_keeps_every_row_and_ids_are_never_reused(db_url: str, start: str) -> None:
    from sqlalchemy.orm import sessionmaker

    url = db_url
    before: Snapshot = {}
    if start != "empty":  # a database made by the previous revision, with rows in every table
        upgrade(url, start)
        eng = make_engine(url)
        old = sessionmaker(bind=eng)
        _populate(old)
        before = _snapshot_rows(old)
        eng.dispose()
    sm = init_db(url)  # migrates to head, as at start
    if before:
        assert _snapshot_rows(sm, like=before) == before  # nothing lost to the table rebuild's cascades
    if not on_postgresql():  # PostgreSQL's sequences never hand out an id twice: 0002 does nothing there
        with sm() as s:
            ddl = dict(s.execute(text("SELECT name, sql FROM sqlite_master WHERE name IN ('datasets', 'runs')")).all())
            assert all("AUTOINCREMENT" in sql for sql in ddl.values()) and len(ddl) == 2
            assert s.execute(text("PRAGMA foreign_keys")).scalar() == 1  # back on after the migration
    _assert_ids_not_reused(sm)


def test_downgrade_from_head_keeps_rows(db_url: str) -> None:
    url = db_url
    sm = init_db(url)
    _populate(sm)
    before = _snapshot_rows(sm)
    sm.kw["bind"].dispose()
    downgrade(url, "0001_initial")
    eng = make_engine(url)
    with eng.connect() as conn:
        if not on_postgresql():
            sql = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'datasets'")).scalar()
            assert "AUTOINCREMENT" not in sql
        assert conn.execute(text("SELECT count(*) FROM images")).scalar() == 2
    eng.dispose()
    sm = init_db(url)
    assert _snapshot_rows(sm, like=before) == before


# --- a search's clock moves from its JSON summary into columns (0006_search_state) ---------------

def test_0006_moves_the_sitting_clock_into_columns_and_back(db_url: str) -> None:
    from sqlalchemy.orm import sessionmaker

    url = db_url
    upgrade(url, "0005_dataset_versions")
    eng = make_engine(url)
    started = 1_800_000_000.5  # a POSIX time, as the first worker of a sitting wrote it
    log = [{"at": "2027-01-15T08:00:00", "level": "info", "message": "trial 0 started"}]
    with sessionmaker(bind=eng).begin() as s:
        ds = repo.add_dataset(s, name="d", source="src", classes=["a", "b"], health={}, split_config={}, skipped=[],
                              num_images=0)
        # Only the columns revision 0005 has (the model has more).
        common = dict(dataset_id=ds.id, status="running", objective="macro-f1", device="this-machine", budget={},
                      time_budget_s=600.0, spent_s=120.0, created_at=utcnow())
        s.execute(insert(Search.__table__).values(id=1, study_name="s1", summary={
            "sitting_started": started, "reserve_s": 42.5, "log": log}, **common))
        s.execute(insert(Search.__table__).values(id=2, study_name="s2", summary={"winner_run_id": 3}, **common))
    eng.dispose()

    sm = init_db(url)
    with sm() as s:
        running, done = s.get(Search, 1), s.get(Search, 2)
        assert running is not None and done is not None
        assert running.sitting_started_at == datetime.fromtimestamp(started, UTC) and running.reserve_s == 42.5
        assert running.summary == {"log": log} and running.spent_s == 120.0 and running.plan is None
        assert (done.sitting_started_at, done.reserve_s, done.summary) == (None, None, {"winner_run_id": 3})
    sm.kw["bind"].dispose()

    downgrade(url, "0005_dataset_versions")
    eng = make_engine(url)
    with eng.connect() as conn:
        assert {c["name"] for c in inspect(conn).get_columns("searches")}.isdisjoint(
            {"sitting_started_at", "reserve_s", "plan"})
        rows = dict(conn.execute(select(Search.__table__.c.id, Search.__table__.c.summary)).all())
    eng.dispose()
    assert rows[1] == {"sitting_started": started, "reserve_s": 42.5, "log": log}
    assert rows[2] == {"winner_run_id": 3}
