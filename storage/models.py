"""SQLAlchemy models: the whole Workbench schema.

Every table is created by the Alembic revisions in storage/migrations/versions.
Paths stored here are always RELATIVE to the data dir, so a data dir can be moved.
Timestamps are timezone-aware UTC.
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Stable constraint names so Alembic batch migrations on SQLite can find and alter them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """DateTime that always comes back timezone-aware UTC.

    SQLite has no timezone type and returns naive datetimes; this keeps every
    value comparable with ``datetime.now(timezone.utc)``.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Dataset(Base):
    __tablename__ = "datasets"
    # AUTOINCREMENT: a deleted dataset's id is never given to a new one (ids appear in
    # commands, logs and exported model cards, so a reused id would point at the wrong data).
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    source: Mapped[str] = mapped_column(String(1000))
    num_images: Mapped[int] = mapped_column(Integer, default=0)
    num_classes: Mapped[int] = mapped_column(Integer, default=0)
    # Sorted class names; list index = class id used by training and export.
    classes: Mapped[list[str]] = mapped_column(JSON, default=list)
    health: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    split_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    skipped: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)

    images: Mapped[list[Image]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True
    )
    runs: Mapped[list[Run]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True
    )


class DatasetVersion(Base):
    """How a dataset was derived from another by a fix: one row per derived dataset.

    A version is a dataset row of its own (its own images rows pointing at the same
    content-addressed store files), so a run keeps pointing at exactly the images it trained
    on. A dataset without a row here is version 1 of itself (an ingest).
    """

    __tablename__ = "dataset_versions"

    dataset_id: Mapped[int] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True
    )
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True, index=True
    )
    # The first version's id and name: the family survives the deletion of a middle version.
    root_id: Mapped[int] = mapped_column(Integer, index=True)
    root_name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    # {"fix", "params", "summary", "dropped", "moved", "relabelled", "kept", "by", ...}
    change: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (Index("ix_images_dataset_id_split", "dataset_id", "split"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    store_path: Mapped[str] = mapped_column(String(300))  # e.g. store/ab/abcdef...png
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    phash: Mapped[str] = mapped_column(String(32))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(20))  # original PIL mode, or 'DICOM'
    label: Mapped[str] = mapped_column(String(200))
    split: Mapped[str] = mapped_column(String(10))  # train | val | test
    group: Mapped[str | None] = mapped_column(String(300), nullable=True)
    original_name: Mapped[str] = mapped_column(String(1000))

    dataset: Mapped[Dataset] = relationship(back_populates="images")


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = {"sqlite_autoincrement": True}  # run ids are never reused either (run_00042/)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    variant: Mapped[str] = mapped_column(String(100))
    resolution: Mapped[int] = mapped_column(Integer)
    preset: Mapped[str] = mapped_column(String(50))
    status: Mapped[str] = mapped_column(String(20))  # set by the service that creates the row (workbench.status)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    worker_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoint_path: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    best_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    batch_label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    train_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # A trial of an Auto search: its search and Optuna trial number (None for a plain run).
    search_id: Mapped[int | None] = mapped_column(
        ForeignKey("searches.id", ondelete="CASCADE"), nullable=True, index=True
    )
    trial_number: Mapped[int | None] = mapped_column(Integer, nullable=True)

    dataset: Mapped[Dataset] = relationship(back_populates="runs")
    metrics: Mapped[list[RunMetric]] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True
    )
    events: Mapped[list[RunEvent]] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True
    )
    evaluations: Mapped[list[Evaluation]] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True
    )


class RunMetric(Base):
    __tablename__ = "run_metrics"
    __table_args__ = (UniqueConstraint("run_id", "epoch", "phase"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(50))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    run: Mapped[Run] = relationship(back_populates="metrics")


class RunEvent(Base):
    __tablename__ = "run_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(20), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    run: Mapped[Run] = relationship(back_populates="events")


class Evaluation(Base):
    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    split: Mapped[str] = mapped_column(String(10))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    tta: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")

    run: Mapped[Run] = relationship(back_populates="evaluations")


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int | None] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), nullable=True, index=True
    )
    dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), nullable=True, index=True
    )
    # checkpoint, onnx_fp32, onnx_fp16, onnx_int8, bundle, plot, eval_json, report, ...
    kind: Mapped[str] = mapped_column(String(50))
    path: Mapped[str] = mapped_column(String(1000))  # relative to the data dir
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Benchmark(Base):
    __tablename__ = "benchmarks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(50))  # e.g. 'latency'
    key: Mapped[str] = mapped_column(String(300), index=True)
    machine: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Search(Base):
    """An Auto search: its budget, state and time spent; trials are runs with ``search_id``.

    The Optuna study (``study_name``) lives in Optuna's own tables in the same database."""

    __tablename__ = "searches"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(20))  # set by the service that creates the row (workbench.status)
    study_name: Mapped[str] = mapped_column(String(100), unique=True)
    objective: Mapped[str] = mapped_column(String(50))
    device: Mapped[str] = mapped_column(String(100))
    budget: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # core.recommend.Budget
    time_budget_s: Mapped[float] = mapped_column(Float)
    spent_s: Mapped[float] = mapped_column(Float, default=0.0)  # wall time of earlier sittings
    # The running sitting's clock (0006_search_state; workbench.search_clock): when its first
    # worker started it, and the time kept back from its trials for the finish. NULL: none runs.
    sitting_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    reserve_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    max_trials: Mapped[int | None] = mapped_column(Integer, nullable=True)
    workers: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Plain ids, not foreign keys: runs already point here (no cycle); deleting a run clears them.
    winner_run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bundle_artifact_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # workbench.summary.SearchSummary
    # What the search is over, fixed when it is queued (workbench.search_plan.SearchPlan);
    # NULL for a search queued before 0006_search_state (its first worker stores one).
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    dataset: Mapped[Dataset] = relationship()


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(50))  # train | evaluate | export | ...
    status: Mapped[str] = mapped_column(String(20), index=True)  # set by workbench.jobs (workbench.status)
    run_id: Mapped[int | None] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), nullable=True, index=True
    )
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    worker_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The claim (0004_worker_leases): which worker on which host runs it, and until when its
    # claim holds without a heartbeat. NULL host: a row claimed before leases (pid check only).
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    host_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Worker(Base):
    """One worker process (any host): what it has, and its heartbeat (workbench.workers)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host/lane/pid-random
    host_id: Mapped[str] = mapped_column(String(100), index=True)
    lane: Mapped[str] = mapped_column(String(20))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_until: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # cpus, memory_gb, gpus, gpu_names, onnx_providers (workbench.workers.Resources)
    resources: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


__all__ = [
    "Base",
    "Dataset",
    "DatasetVersion",
    "Image",
    "Run",
    "RunMetric",
    "RunEvent",
    "Evaluation",
    "Artifact",
    "Benchmark",
    "Job",
    "Search",
    "Worker",
    "utcnow",
    "UTCDateTime",
]
