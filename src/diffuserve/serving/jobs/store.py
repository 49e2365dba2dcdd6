"""Where jobs are kept: one table through SQLAlchemy Core, in SQLite (a file in WAL mode, or memory) or the
database a URL names (PostgreSQL through psycopg)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from diffuserve.types import JobState

METADATA = sa.MetaData()
JOBS = sa.Table(
    "diffuserve_jobs",
    METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False, index=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("operation", sa.String(16), nullable=False),
    sa.Column("priority", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    # The validated request body (its seed fixed), to run again after a restart.
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("base_url", sa.String(2048), nullable=False, default=""),
    # The answer a synchronous request would have had (JSON), or the error envelope (JSON) and its status.
    sa.Column("result", sa.LargeBinary),
    sa.Column("error", sa.LargeBinary),
    sa.Column("error_status", sa.Integer),
    sa.Column("webhook_url", sa.String(2048)),
    sa.Column("webhook_state", sa.String(16)),  # pending, delivered, failed
    sa.Column("webhook_attempts", sa.Integer, nullable=False, default=0),
)
UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value)


@dataclass
class JobRecord:
    """One job as stored."""

    id: str
    owner: str
    model: str
    operation: str  # generations or edits
    priority: str
    state: str
    created_at: float
    body: bytes
    base_url: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    result: bytes | None = None
    error: bytes | None = None
    error_status: int | None = None
    webhook_url: str | None = None
    webhook_state: str | None = None
    webhook_attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def final(self) -> bool:
        return JobState(self.state).final

    def columns(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}


def database_url(jobs_db: str | None) -> str:
    """JOBS_DB as an SQLAlchemy URL: unset = SQLite in memory; a path = a SQLite file; a URL as given, with
    psycopg (version 3) as PostgreSQL's driver unless the URL names one."""
    if not jobs_db:
        return "sqlite://"
    if "://" not in jobs_db:
        return "sqlite:///" + os.path.abspath(os.path.expanduser(jobs_db))
    scheme, rest = jobs_db.split("://", 1)
    if scheme in ("postgres", "postgresql"):
        return "postgresql+psycopg://" + rest
    return jobs_db


class JobStore:
    """The jobs table. Every call is blocking: the job manager calls it from its own thread."""

    def __init__(self, jobs_db: str | None) -> None:
        url = database_url(jobs_db)
        self.persistent = url != "sqlite://"
        if url.startswith("sqlite"):
            kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
            if not self.persistent:
                kwargs["poolclass"] = StaticPool  # one shared in-memory database
            self.engine = sa.create_engine(url, **kwargs)
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True)
        METADATA.create_all(self.engine)

    def add(self, record: JobRecord) -> None:
        with self.engine.begin() as db:
            db.execute(JOBS.insert().values(**record.columns()))

    def update(self, job_id: str, **values: Any) -> None:
        with self.engine.begin() as db:
            db.execute(JOBS.update().where(JOBS.c.id == job_id).values(**values))

    def get(self, job_id: str) -> JobRecord | None:
        with self.engine.connect() as db:
            row = db.execute(JOBS.select().where(JOBS.c.id == job_id)).mappings().first()
        return JobRecord(**row) if row is not None else None

    def owned(self, owner: str, limit: int, before: float | None = None) -> list[JobRecord]:
        """An owner's jobs, newest first, without their answers (they can be megabytes each)."""
        columns = [c for c in JOBS.c if c.name not in ("result", "body")]
        query = sa.select(*columns).where(JOBS.c.owner == owner)
        if before is not None:
            query = query.where(JOBS.c.created_at < before)
        query = query.order_by(JOBS.c.created_at.desc()).limit(limit)
        with self.engine.connect() as db:
            rows = db.execute(query).mappings().all()
        return [JobRecord(**row, body=b"") for row in rows]

    def unfinished(self) -> list[JobRecord]:
        """Jobs a restart must run again, oldest first."""
        query = JOBS.select().where(JOBS.c.state.in_(UNFINISHED)).order_by(JOBS.c.created_at)
        with self.engine.connect() as db:
            return [JobRecord(**row) for row in db.execute(query).mappings().all()]

    def webhooks_pending(self) -> list[JobRecord]:
        """Finished jobs whose webhook was not delivered yet (the server stopped while it was being tried)."""
        query = JOBS.select().where(JOBS.c.webhook_state == "pending").order_by(JOBS.c.finished_at)
        with self.engine.connect() as db:
            return [JobRecord(**row) for row in db.execute(query).mappings().all()]

    def purge(self, finished_before: float) -> int:
        """Forget finished jobs older than the cut-off whose webhooks are settled; how many went."""
        query = JOBS.delete().where(
            JOBS.c.finished_at < finished_before,
            sa.or_(JOBS.c.webhook_state.is_(None), JOBS.c.webhook_state != "pending"),
        )
        with self.engine.begin() as db:
            return int(db.execute(query).rowcount or 0)

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    # WAL: readers never wait for the writer, and a crash mid-write keeps the last committed state.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
