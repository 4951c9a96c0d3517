"""The node's schema: received series and instances, the analysis job queue, results, outputs and
their deliveries. SQLAlchemy 2.0 typed models; the same schema runs on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from storage.db import Base, UTCDateTime, utcnow

UID_LEN = 64


class SeriesState:
    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState:
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class OutputsState:
    """What became of an analysed series' outputs (SR, maps, PDF), per job."""

    PENDING = "pending"  # not built yet (job pending or running)
    WRITTEN = "written"  # written and queued for every destination; outputs_error lists any left out
    # the SR and the rest written and queued, but an output the source could hold failed to build
    # (an error, not a limit of the source): outputs_error names it; rebuild-outputs --failed retries
    PARTIAL = "partial"
    FAILED = "failed"  # nothing (or no SR) could be built, written or queued: outputs_error says why
    NONE = "none"  # no outputs are due: the series was skipped or its analysis failed


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LEN))
    scanner_name: Mapped[str | None] = mapped_column(String(64))  # config name; None for offline imports
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer_host: Mapped[str | None] = mapped_column(String(64))
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(64))
    device_serial: Mapped[str | None] = mapped_column(String(64))
    station_name: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    protocol_name: Mapped[str | None] = mapped_column(String(64))
    acquired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING)
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    generation: Mapped[int] = mapped_column(Integer, default=1)  # +1 each time a late instance re-opens it
    completions: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.id")

    __table_args__ = (
        # the completion sweep: receiving series ordered by their last arrival
        Index("ix_series_state_last_received", "state", "last_received_at"),
        Index("ix_series_scanner_acquired", "scanner_name", "acquired_at"),
    )


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LEN))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LEN))
    rel_path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class InstanceConflict(Base):
    """A second copy of a SOP Instance UID with different bytes: the first is kept, this is counted."""

    __tablename__ = "instance_conflicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    """The database-backed analysis queue: pending -> running -> done | failed."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    models: Mapped[str] = mapped_column(String(256))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str | None] = mapped_column(String(16))  # analysis result: done | skipped | failed
    worker: Mapped[str | None] = mapped_column(String(128))  # who holds it while running
    # the running worker's lease: renewed by its heartbeat; once past, another worker may claim the job
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_by: Mapped[str | None] = mapped_column(String(128))  # the worker that closed it
    error: Mapped[str | None] = mapped_column(Text)
    # OutputsState; NULL while the job is pending/running (and in databases from before this column)
    outputs: Mapped[str | None] = mapped_column(String(16))
    outputs_error: Mapped[str | None] = mapped_column(Text)  # why outputs failed or which were left out
    # series selection (analysis.selection), JSON: {"reconstruction": key, "decisions": [{model,
    # selected, rule, reason}, ...]}; NULL when the series could not be loaded (or before this column)
    selection: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    series: Mapped[Series] = relationship()

    __table_args__ = (Index("ix_jobs_state_created", "state", "created_at"),)


class ReconstructionClaim(Base):
    """Which series of a study analyses a reconstruction (``SeriesFacts.reconstruction_key``): taken
    atomically by the first worker whose series would be analysed (the unique constraint decides
    between concurrent workers, on every machine sharing the database); another series of the study
    with the same key is then a duplicate of ``series_id``. Released (deleted) when the holding job
    ends without analysing the series (failed, skipped) unless the series analysed it before
    (``analysed``); a claim whose job failed is stale and taken over by the next claimer."""

    __tablename__ = "reconstruction_claims"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LEN))
    key_sha256: Mapped[str] = mapped_column(String(64))  # SHA-256 of the key (a key may be long)
    reconstruction: Mapped[str] = mapped_column(Text)  # the key itself
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)  # the job that holds it now
    analysed: Mapped[bool] = mapped_column(Boolean, default=False)  # a job of series_id analysed it (done)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("study_instance_uid", "key_sha256", name="uq_reconstruction_claim"),)


class AnalysisRun(Base):
    """One model's results for one series. A re-analysis marks older runs ``current = False``."""

    __tablename__ = "analysis_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    model: Mapped[str] = mapped_column(String(32))
    algorithm: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(32))
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    info: Mapped[str | None] = mapped_column(Text)  # JSON object of text context (kernel, SSDE phantom, ...)
    current: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    metrics: Mapped[list[SeriesMetric]] = relationship(back_populates="run", cascade="all, delete-orphan")

    __table_args__ = (Index("ix_runs_series_current", "series_id", "current"),)


class SeriesMetric(Base):
    __tablename__ = "series_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("analysis_runs.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)

    run: Mapped[AnalysisRun] = relationship(back_populates="metrics")

    __table_args__ = (UniqueConstraint("run_id", "name", name="uq_series_metric_run_name"),)


class SliceMetric(Base):
    __tablename__ = "slice_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("analysis_runs.id"), index=True)
    slice_index: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN))
    frame_number: Mapped[int | None] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float | None] = mapped_column(Float)


class OutputObject(Base):
    """A DICOM object the node made (SR, Parametric Map, readable report), written before any send."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    kind: Mapped[str] = mapped_column(String(16))  # sr | pmap | pdf
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LEN))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    rel_path: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DeliveryState:
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class Delivery(Base):
    """One output to one destination: the outbox row the sender works on."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    output: Mapped[OutputObject] = relationship()

    __table_args__ = (
        UniqueConstraint("output_id", "destination", name="uq_delivery_output_destination"),
        # the sender's poll: due pending deliveries
        Index("ix_deliveries_state_next_attempt", "state", "next_attempt_at"),
    )


class Rating(Base):
    """One rater's score of one image (slice or frame) on the LDCTIQA / Delta-IQA Likert scale 0-4,
    made on the rating page (``qa-node rate``) or imported from a ratings CSV. An imported mean over
    raters may be fractional. An undo on the page sets ``withdrawn_at`` (the row stays, for the record;
    exports leave withdrawn ratings out)."""

    __tablename__ = "ratings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rater: Mapped[str | None] = mapped_column(String(64))  # None: not named (e.g. an imported mean)
    rated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    frame: Mapped[int | None] = mapped_column(Integer)  # 1-based frame of a multi-frame image, else None
    score: Mapped[float] = mapped_column(Float)
    path: Mapped[str] = mapped_column(String(1024))  # the DICOM file (absolute)
    source: Mapped[str] = mapped_column(String(16), default="page")  # page | import
    withdrawn_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Calibration(Base):
    """A monotone map of one metric to the site's Likert scale (0-4), fitted by ``qa-node calibrate``
    on per-image scores against a ratings file, with its agreement statistics. The newest row of a
    metric is the one in use: analyses after it carry ``<metric>_likert``. Rows are never changed."""

    __tablename__ = "calibrations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    metric: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    method: Mapped[str] = mapped_column(String(16))  # isotonic | logistic
    parameters: Mapped[str] = mapped_column(Text)  # JSON: analysis.calibration.LikertMap.to_dict()
    n_ratings: Mapped[int] = mapped_column(Integer)  # rows of the ratings file used
    n_images: Mapped[int] = mapped_column(Integer)  # distinct rated images with a score (ratings averaged)
    n_series: Mapped[int] = mapped_column(Integer)
    ratings_file: Mapped[str] = mapped_column(String(1024))
    ratings_sha256: Mapped[str] = mapped_column(String(64))
    statistics: Mapped[str] = mapped_column(Text)  # JSON: raw and cross-validated statistics with 95 % CIs
    # the model that produced the scores: "<algorithm> <version>" and its weights' SHA-256 (None: no
    # weights); an analysis by another version or other weights gets no <metric>_likert from this row
    model_version: Mapped[str | None] = mapped_column(String(200))
    weights_sha256: Mapped[str | None] = mapped_column(String(64))


# Columns added after the first release: (table, column, DDL type). ``create_all`` does not alter
# existing tables, so ``upgrade_schema`` adds them to a database created by an earlier version.
# (A new table, e.g. reconstruction_claims, needs no entry: ``create_all`` creates missing tables.)
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("jobs", "outputs", "VARCHAR(16)"),
    ("jobs", "outputs_error", "TEXT"),
    ("jobs", "lease_until", "TIMESTAMP"),
    ("jobs", "finished_by", "VARCHAR(128)"),
    ("jobs", "selection", "TEXT"),
)


def upgrade_schema(engine) -> list[str]:
    """Add the nullable columns of ADDED_COLUMNS that an existing database lacks (SQLite and
    PostgreSQL). Returns the ``table.column`` names added."""
    from sqlalchemy import inspect, text

    added = []
    insp = inspect(engine)
    tables = set(insp.get_table_names())
    with engine.begin() as conn:
        for table, column, ddl in ADDED_COLUMNS:
            if table not in tables:
                continue
            if column in {c["name"] for c in inspect(conn).get_columns(table)}:
                continue
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}"))
            added.append(f"{table}.{column}")
    return added
