"""Durable job store on SQLAlchemy Core: one job record for every dialect, plus logs, workers and uploads.

SQLite (WAL) is the embedded default; any SQLAlchemy URL (e.g. `postgresql+psycopg://…`) works unchanged
because every statement here is portable SQLAlchemy Core (the one PostgreSQL-specific statement is the claim's
`FOR UPDATE SKIP LOCKED`). Each write is its own short transaction of a single
statement (no read-then-write upgrades), so concurrent API/worker writers never deadlock on SQLite. Every status
change goes through `_transition`: it allows only the moves in `server.states.TRANSITIONS` and is a conditional
update (`WHERE status = …`), so it stays atomic on any backend.

Several server instances may share one PostgreSQL store: a running job carries a lease (`lease_expires_at`)
that its worker's heartbeat renews; whichever instance sees a lease expire recovers the job (see
`server.supervisor`). The schema is versioned by `server.migrations`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from server.states import IllegalTransition, JobStatus, WebhookStatus, check_transition

_FINAL = frozenset(s for s in JobStatus if s.is_terminal)

#: Histogram bucket bounds (seconds) for stage durations exported on /metrics.
STAGE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("dialect", sa.String(32), nullable=False),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("extra", sa.JSON, nullable=False, default=dict),
    sa.Column("status", sa.String(16), nullable=False, default=JobStatus.QUEUED),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("stage", sa.String(16)),
    sa.Column("step", sa.Integer, nullable=False, default=0),
    sa.Column("total", sa.Integer, nullable=False, default=0),
    sa.Column("progress", sa.Float, nullable=False, default=0.0),
    sa.Column("outputs", sa.JSON, nullable=False, default=list),
    sa.Column("result", sa.JSON),
    sa.Column("error", sa.Text),
    sa.Column("error_type", sa.String(64)),
    sa.Column("timings", sa.JSON, nullable=False, default=dict),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("worker_id", sa.String(64)),
    sa.Column("heartbeat_at", sa.Float),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("webhook_url", sa.Text),
    sa.Column("webhook_status", sa.String(16)),
    sa.Column("webhook_attempts", sa.Integer, nullable=False, default=0),
    sa.Column("webhook_next_at", sa.Float),
    #: Until when the claiming worker owns the running job (renewed by its heartbeat); schema version 2.
    sa.Column("lease_expires_at", sa.Float),
    #: Hash of the API key that created the job (`server.auth.owner_of_key`); NULL = created without keys.
    #: Schema version 3.
    sa.Column("owner", sa.String(64)),
    #: The failure as data, `[{"field": user field or null, "message": the rule broken, "type": short kind}]`,
    #: so each dialect renders it in its own envelope without parsing `error` back; schema version 5.
    sa.Column("error_detail", sa.JSON),
    sa.Index("ix_jobs_queue", "status", "priority", "created_at"),
    sa.Index("ix_jobs_webhook", "webhook_status", "webhook_next_at"),
    sa.Index("ix_jobs_finished", "finished_at"),
    #: Per-key queued counts (the per-key cap); schema version 6.
    sa.Index("ix_jobs_owner_status", "owner", "status"),
)

job_logs = sa.Table(
    "job_logs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), nullable=False, index=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("level", sa.String(8), nullable=False, default="info"),
    sa.Column("source", sa.String(16), nullable=False, default="server"),
    sa.Column("message", sa.Text, nullable=False),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("slot", sa.Integer, nullable=False),
    sa.Column("instance", sa.String(64), nullable=False, index=True),
    sa.Column("pid", sa.Integer),
    sa.Column("device", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("model", sa.String(255)),
    sa.Column("message", sa.Text),
    sa.Column("info", sa.JSON, nullable=False, default=dict),
    sa.Column("current_job", sa.String(64)),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float),
)

uploads = sa.Table(
    "uploads",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("token", sa.String(64), nullable=False),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("content_type", sa.String(128)),
    sa.Column("size", sa.BigInteger),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("completed_at", sa.Float),
    sa.Column("owner", sa.String(64)),
)

stage_stats = sa.Table(
    "stage_stats",
    metadata,
    sa.Column("slot", sa.Integer, primary_key=True),
    sa.Column("stage", sa.String(16), primary_key=True),
    sa.Column("count", sa.Integer, nullable=False, default=0),
    sa.Column("total", sa.Float, nullable=False, default=0.0),
    sa.Column("buckets", sa.JSON, nullable=False, default=list),
)

#: Secrets every instance sharing the store must agree on (the file-URL HMAC key); schema version 4.
server_secrets = sa.Table(
    "server_secrets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
)


#: Fair claiming: when each owner (API key hash; '' for jobs made without keys) last had a job claimed, as a
#: store-wide counter (not a clock, so instances with skewed clocks agree); schema version 6.
queue_turns = sa.Table(
    "queue_turns",
    metadata,
    sa.Column("owner", sa.String(64), primary_key=True),
    sa.Column("served", sa.BigInteger, nullable=False),
)


class OwnerQueueFull(Exception):
    """The owner already has `cap` jobs queued (`Store.insert_job(owner_cap=)`); nothing was inserted."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"{cap} jobs queued for this owner")
        self.cap = cap


@dataclass
class JobRecord:
    """One job as stored; dialects render it (status vocabulary, URLs, envelopes) in their own shape."""

    id: str
    dialect: str
    model: str
    spec: dict[str, Any]
    extra: dict[str, Any]
    #: A `JobStatus` value, kept as the stored string: a row written by a newer version with a status this one
    #: does not know still loads, and the dialect rendering it reports the problem.
    status: str
    priority: int
    stage: str | None
    step: int
    total: int
    progress: float
    outputs: list[dict[str, Any]]
    result: dict[str, Any] | None
    error: str | None
    error_type: str | None
    timings: dict[str, float]
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    attempts: int
    worker_id: str | None
    heartbeat_at: float | None
    cancel_requested: bool
    webhook_url: str | None
    webhook_status: str | None
    webhook_attempts: int
    webhook_next_at: float | None
    lease_expires_at: float | None = None
    owner: str | None = None
    error_detail: list[dict[str, Any]] | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.status in _FINAL

    @classmethod
    def from_row(cls, row: sa.Row) -> JobRecord:
        d = dict(row._mapping)
        d["extra"] = d.get("extra") or {}
        d["outputs"] = d.get("outputs") or []
        d["timings"] = d.get("timings") or {}
        d["cancel_requested"] = bool(d.get("cancel_requested"))
        return cls(**d)


def new_id() -> str:
    return uuid.uuid4().hex


#: Makes a finished job's webhook due (stays NULL when the job has none); every terminal transition sets it.
_WEBHOOK_DUE = sa.case((jobs.c.webhook_url.is_not(None), WebhookStatus.PENDING), else_=None)
#: What a job going back to the queue forgets of its last run.
_REQUEUED: dict[str, Any] = {"worker_id": None, "stage": None, "step": 0, "total": 0, "progress": 0.0,
                             "heartbeat_at": None, "lease_expires_at": None}


def _transition(c: sa.Connection, job_id: str | sa.ColumnElement[Any], to: JobStatus, *, from_: JobStatus,
                where: Sequence[sa.ColumnElement[bool]] = (), values: dict[str, Any] | None = None,
                log_line: tuple[str, str] | None = None) -> str | None:
    """Move one job from `from_` to `to`: the only place a job's status changes. Returns the moved job's id, or
    None when the job is no longer in `from_` (or misses `where`), i.e. another writer got there first.

    The move must be in `server.states.TRANSITIONS` (else `IllegalTransition`, before any write). The UPDATE's
    `WHERE status = from_` guard makes it a compare-and-set, so racing claims, finishes and recoveries have
    exactly one winner on any backend. A terminal `to` stamps `finished_at` and makes the webhook due.
    `log_line` = (level, message) is added to the job's log in the same transaction when the move happens.
    """
    check_transition(from_, to)
    now = time.time()
    vals: dict[str, Any] = {"updated_at": now, **(values or {}), "status": to}
    if to.is_terminal:
        vals.update(finished_at=now, webhook_status=_WEBHOOK_DUE, webhook_next_at=now)
    moved = c.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == from_, *where).values(**vals)
                      .returning(jobs.c.id)).scalar_one_or_none()
    if moved is not None and log_line is not None:
        level, message = log_line
        c.execute(job_logs.insert().values(job_id=moved, ts=now, level=level, source="server", message=message))
    return moved


def _same_owner(owner: str | None) -> sa.ColumnElement[bool]:
    return jobs.c.owner.is_(None) if owner is None else jobs.c.owner == owner


def _queued_count(owner: str | None) -> sa.Select[Any]:
    return sa.select(sa.func.count()).select_from(jobs).where(_same_owner(owner), jobs.c.status == JobStatus.QUEUED)


#: An owner's key in `queue_turns` ('' for jobs made without keys).
_TURN_KEY = sa.func.coalesce(jobs.c.owner, "")
#: When the owner of a queued job was last served (0: never), for the fair claim order.
_LAST_SERVED = sa.func.coalesce(
    sa.select(queue_turns.c.served).where(queue_turns.c.owner == _TURN_KEY).scalar_subquery(), 0)
#: The claim order: priority, then the owner served longest ago (round-robin across keys), then oldest first.
_FAIR_ORDER = (jobs.c.priority, _LAST_SERVED, jobs.c.created_at, jobs.c.id)


def _mark_served(c: sa.Connection, job_id: str) -> None:
    """Record that the owner of the just-claimed job was served now: it goes to the back of the round."""
    owner = c.execute(sa.select(_TURN_KEY).where(jobs.c.id == job_id)).scalar_one()
    nxt = sa.select(sa.func.coalesce(sa.func.max(queue_turns.c.served), 0) + 1).scalar_subquery()
    if c.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = insert(queue_turns).values(owner=owner, served=nxt)
    c.execute(stmt.on_conflict_do_update(index_elements=[queue_turns.c.owner], set_={"served": stmt.excluded.served}))


class StoreOnEventLoop(RuntimeError):
    """A store call made on a thread that runs an event loop: it would stall every request on that loop (a
    locked SQLite file waits up to 15 s, a network database a round trip). Handlers reach the store through
    the services' async methods (`server.offload`); this is the bug that skipped them."""


def _refuse_on_event_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return  # a worker thread, a worker process, the CLI: blocking is fine here
    raise StoreOnEventLoop("a job-store call on the event loop thread; await it through the services' async "
                           "methods (server.offload) instead")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=15000")
    cur.close()


class Store:
    """Thread-safe access to the job store; one instance per process (API process, each worker). Blocking: every
    call refuses to run on a thread with a running event loop (`StoreOnEventLoop`)."""

    def _begin(self) -> contextlib.AbstractContextManager[sa.Connection]:
        _refuse_on_event_loop()
        return self.engine.begin()

    def _connect(self) -> sa.Connection:
        _refuse_on_event_loop()
        return self.engine.connect()

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"future": True}
        is_sqlite = url.startswith("sqlite")
        if is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 15}
            kwargs["pool_size"] = 16
            kwargs["max_overflow"] = 32
        else:  # a server on the network restarts or fails over: test pooled connections before use
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = sa.create_engine(url, **kwargs)
        if is_sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)

    def create_all(self) -> None:
        """Create the tables, or upgrade an existing store's schema in place (`server.migrations`)."""
        from server.migrations import upgrade

        upgrade(self.engine, metadata)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def dispose(self) -> None:
        self.engine.dispose()

    # ---- jobs: create / read -------------------------------------------------------------------------

    def insert_job(
        self,
        *,
        dialect: str,
        model: str,
        spec: dict[str, Any],
        extra: dict[str, Any] | None = None,
        webhook_url: str | None = None,
        priority: int = 0,
        job_id: str | None = None,
        logs: list[str] | None = None,
        owner: str | None = None,
        owner_cap: int | None = None,
    ) -> JobRecord:
        """Insert a queued job (and its first log lines) in one transaction; returns the new record.

        `owner_cap`: refuse (`OwnerQueueFull`, nothing inserted) when `owner` would have more than this many
        jobs queued. Exact under concurrency: the insert comes first and the count after it in the same
        transaction, which SQLite serialises (one writer) and PostgreSQL under a per-owner advisory lock.
        """
        now = time.time()
        row: dict[str, Any] = {
            "id": job_id or new_id(), "dialect": dialect, "model": model, "spec": spec, "extra": extra or {},
            "status": JobStatus.QUEUED, "priority": priority, "stage": None, "step": 0, "total": 0, "progress": 0.0,
            "outputs": [], "result": None, "error": None, "error_type": None, "timings": {}, "created_at": now,
            "started_at": None, "finished_at": None, "updated_at": now, "attempts": 0, "worker_id": None,
            "heartbeat_at": None, "cancel_requested": False, "webhook_url": webhook_url, "webhook_status": None,
            "webhook_attempts": 0, "webhook_next_at": None, "owner": owner,
        }
        with self._begin() as c:
            if owner_cap is not None and self.is_postgres:
                c.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"),
                          {"k": zlib.crc32(f"vace:queue:{owner or ''}".encode())})
            c.execute(jobs.insert(), row)
            if owner_cap is not None and c.execute(_queued_count(owner)).scalar_one() > owner_cap:
                raise OwnerQueueFull(owner_cap)  # rolls the insert back
            if logs:
                c.execute(job_logs.insert(), [
                    {"job_id": row["id"], "ts": now, "level": "info", "source": "server", "message": m}
                    for m in logs
                ])
        return JobRecord(**row)

    def page_jobs(self, dialect: str, *, after: str | None, limit: int, ascending: bool,
                  owner: str | None = None) -> tuple[list[JobRecord], bool] | None:
        """One page of `dialect`'s jobs visible to `owner` (its own and those made without keys), ordered by
        (created_at, id), starting after the job `after`; returns (page, has_more), or None when `after` is
        not such a job."""
        t = jobs
        mine = t.c.dialect == dialect
        if owner is not None:
            mine = sa.and_(mine, sa.or_(t.c.owner == owner, t.c.owner.is_(None)))
        q = t.select().where(mine)
        with self._connect() as c:
            if after:
                row = c.execute(sa.select(t.c.created_at, t.c.id).where(t.c.id == after, mine)).first()
                if row is None:
                    return None
                ts, jid = row
                if ascending:
                    q = q.where(sa.or_(t.c.created_at > ts, sa.and_(t.c.created_at == ts, t.c.id > jid)))
                else:
                    q = q.where(sa.or_(t.c.created_at < ts, sa.and_(t.c.created_at == ts, t.c.id < jid)))
            keys = (t.c.created_at, t.c.id) if ascending else (t.c.created_at.desc(), t.c.id.desc())
            rows = c.execute(q.order_by(*keys).limit(limit + 1)).all()
        return [JobRecord.from_row(r) for r in rows[:limit]], len(rows) > limit

    def get_job(self, job_id: str, *, with_logs: bool = False) -> JobRecord | None:
        with self._connect() as c:
            row = c.execute(jobs.select().where(jobs.c.id == job_id)).first()
            if row is None:
                return None
            rec = JobRecord.from_row(row)
            if with_logs:
                rec.logs = [
                    dict(r._mapping)
                    for r in c.execute(
                        sa.select(job_logs.c.ts, job_logs.c.level, job_logs.c.source, job_logs.c.message)
                        .where(job_logs.c.job_id == job_id)
                        .order_by(job_logs.c.id)
                    )
                ]
        return rec

    def queue_position(self, job_id: str) -> int | None:
        """Jobs ahead of this one in the fair claim order (0 = next to run), if no other job arrives; None when
        it is not queued.

        Every job of a lower priority value is ahead. Within its priority, keys take turns (`claim_next`): if
        this is its owner's k-th queued job (0-based), every other owner P runs min(n_P, k) jobs before it, one
        more when P's turn comes first (served longer ago, or never and its oldest job is older).
        """
        t = jobs
        with self._connect() as c:
            row = c.execute(sa.select(t.c.status, t.c.priority, t.c.created_at, t.c.owner)
                            .where(t.c.id == job_id)).first()
            if row is None or row.status != JobStatus.QUEUED:
                return None
            queued = t.c.status == JobStatus.QUEUED
            same_prio = sa.and_(queued, t.c.priority == row.priority)
            before = c.execute(sa.select(sa.func.count()).select_from(t).where(queued, t.c.priority < row.priority)
                               ).scalar_one()
            k = c.execute(sa.select(sa.func.count()).select_from(t).where(
                same_prio, _same_owner(row.owner),
                sa.or_(t.c.created_at < row.created_at, sa.and_(t.c.created_at == row.created_at, t.c.id < job_id)),
            )).scalar_one()
            owners = c.execute(
                sa.select(_TURN_KEY.label("owner"), sa.func.count().label("n"),
                          sa.func.min(t.c.created_at).label("oldest"))
                .where(same_prio).group_by(_TURN_KEY)
            ).all()
            served = dict(c.execute(sa.select(queue_turns.c.owner, queue_turns.c.served)
                                    .where(queue_turns.c.owner.in_([o.owner for o in owners]))).all())
        turn = {o.owner: (served.get(o.owner, 0), o.oldest, o.owner) for o in owners}
        mine = row.owner or ""
        ahead = before + k
        for o in owners:
            if o.owner != mine:
                ahead += min(o.n, k + (1 if turn[o.owner] < turn[mine] else 0))
        return int(ahead)

    def count_by_status(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(JobStatus, 0)
        with self._connect() as c:
            for status, n in c.execute(sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)):
                counts[status] = int(n)
        return counts

    def queue_depth(self) -> int:
        with self._connect() as c:
            return int(c.execute(
                sa.select(sa.func.count()).select_from(jobs).where(jobs.c.status == JobStatus.QUEUED)
            ).scalar_one())

    def queued_of(self, owner: str | None) -> int:
        """Jobs `owner` has queued (None: jobs made without keys)."""
        with self._connect() as c:
            return int(c.execute(_queued_count(owner)).scalar_one())

    def add_log(self, job_id: str, message: str, *, level: str = "info", source: str = "server") -> None:
        with self._begin() as c:
            c.execute(job_logs.insert().values(job_id=job_id, ts=time.time(), level=level, source=source,
                                               message=message))

    # ---- jobs: worker side ---------------------------------------------------------------------------

    def claim_next(self, worker_id: str, lease_s: float = 60.0) -> JobRecord | None:
        """Atomically move the first queued job in the fair order to `running` for this worker, leased for
        `lease_s` seconds; None when the queue is empty.

        Fair order: lowest priority value first; within it, the oldest job of the owner (API key) served longest
        ago, so keys take turns (round-robin) however many jobs one of them queued; a key's own jobs run oldest
        first. Jobs made without keys share one turn.

        SQLite: a single conditional UPDATE (`… WHERE id = (first queued) AND status = 'queued'`), so two
        workers racing for the same row cannot both win. PostgreSQL: `SELECT … FOR UPDATE SKIP LOCKED` then
        the UPDATE in one transaction, so concurrent workers on several boxes take different rows instead of
        queueing on the same one.
        """
        if self.is_postgres:
            return self._claim_skip_locked(worker_id, lease_s)
        for _ in range(5):
            now = time.time()
            first = (
                sa.select(jobs.c.id).where(jobs.c.status == JobStatus.QUEUED)
                .order_by(*_FAIR_ORDER).limit(1).scalar_subquery()
            )
            with self._begin() as c:
                jid = _transition(c, first, JobStatus.RUNNING, from_=JobStatus.QUEUED,
                                  values=self._claim_values(worker_id, now, lease_s))
                if jid is not None:
                    _mark_served(c, jid)
            if jid is not None:
                return self.get_job(jid)
            if self.queue_depth() == 0:
                return None
        return None

    @staticmethod
    def _claim_values(worker_id: str, now: float, lease_s: float) -> dict[str, Any]:
        return {"worker_id": worker_id, "started_at": now, "heartbeat_at": now,
                "lease_expires_at": now + lease_s, "updated_at": now, "attempts": jobs.c.attempts + 1,
                "stage": "load", "step": 0, "total": 0}

    def _claim_skip_locked(self, worker_id: str, lease_s: float) -> JobRecord | None:
        now = time.time()
        with self._begin() as c:
            jid = c.execute(
                sa.select(jobs.c.id).where(jobs.c.status == JobStatus.QUEUED)
                .order_by(*_FAIR_ORDER).limit(1)
                .with_for_update(of=jobs, skip_locked=True)
            ).scalar_one_or_none()
            if jid is None:
                return None
            _transition(c, jid, JobStatus.RUNNING, from_=JobStatus.QUEUED,
                        values=self._claim_values(worker_id, now, lease_s))
            _mark_served(c, jid)
        return self.get_job(jid)

    def set_progress(self, job_id: str, worker_id: str, *, stage: str, step: int, total: int,
                     progress: float) -> None:
        now = time.time()
        with self._begin() as c:
            c.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.worker_id == worker_id, jobs.c.status == JobStatus.RUNNING)
                .values(stage=stage, step=step, total=total, progress=progress, updated_at=now, heartbeat_at=now)
            )

    def set_preview(self, job_id: str, worker_id: str, preview: dict[str, Any]) -> None:
        """The running job's latest live preview (`server.worker`), kept as its only `outputs` entry until the
        job finishes (the finished outputs replace it; `output_urls` lists nothing before then)."""
        with self._begin() as c:
            c.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.worker_id == worker_id, jobs.c.status == JobStatus.RUNNING)
                .values(outputs=[preview])
            )

    def cancel_requested(self, job_id: str) -> bool:
        with self._connect() as c:
            v = c.execute(sa.select(jobs.c.cancel_requested).where(jobs.c.id == job_id)).scalar_one_or_none()
        return bool(v)

    def finish_job(
        self,
        job_id: str,
        worker_id: str | None,
        *,
        status: str,
        outputs: list[dict[str, Any]] | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        error_type: str | None = None,
        error_detail: list[dict[str, Any]] | None = None,
        timings: dict[str, float] | None = None,
    ) -> bool:
        """Record the final state; only the worker that owns the running job can (stale workers lose)."""
        to = JobStatus(status)
        if not to.is_terminal:
            raise IllegalTransition(f"finish_job needs a terminal status, not {to}")
        values: dict[str, Any] = {"error": error, "error_type": error_type, "error_detail": error_detail}
        if to == JobStatus.SUCCEEDED:
            values.update(stage="done", progress=1.0, step=jobs.c.total)
        for name, value in (("outputs", outputs), ("result", result), ("timings", timings)):
            if value is not None:
                values[name] = value
        owner = [jobs.c.worker_id == worker_id] if worker_id is not None else []
        with self._begin() as c:
            return _transition(c, job_id, to, from_=JobStatus.RUNNING, where=owner, values=values) is not None

    def request_cancel(self, job_id: str, reason: str = "cancelled by request") -> str | None:
        """Cancel a queued job at once, or flag a running one (its worker stops at the next step).

        Returns the job's status after the call, or None for an unknown id.
        """
        with self._begin() as c:
            if _transition(c, job_id, JobStatus.CANCELLED, from_=JobStatus.QUEUED,
                           values={"cancel_requested": True, "error": reason, "error_type": "cancelled"},
                           log_line=("info", f"{reason} while queued")):
                return JobStatus.CANCELLED
            now = time.time()
            n = c.execute(  # not a status change: the worker sees the flag and moves the job itself
                jobs.update().where(jobs.c.id == job_id, jobs.c.status == JobStatus.RUNNING)
                .values(cancel_requested=True, updated_at=now)
            ).rowcount
            if n:
                c.execute(job_logs.insert().values(job_id=job_id, ts=now, level="info", source="server",
                                                   message="cancel requested; stopping at the next step"))
            status = c.execute(sa.select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one_or_none()
        return status

    def running_jobs(self, worker_ids: list[str] | None = None) -> list[JobRecord]:
        q = jobs.select().where(jobs.c.status == JobStatus.RUNNING)
        if worker_ids is not None:
            q = q.where(jobs.c.worker_id.in_(worker_ids))
        with self._connect() as c:
            return [JobRecord.from_row(r) for r in c.execute(q)]

    def recover_job(self, job: JobRecord, reason: str, *, max_attempts: int) -> str | None:
        """A running job lost its worker: re-queue it if attempts remain, else fail it naming the reason."""
        if job.cancel_requested:
            to, verb = JobStatus.CANCELLED, "cancelled"
            values: dict[str, Any] = {"error": "cancelled by request", "error_type": "cancelled"}
        elif job.attempts < max_attempts:
            to, verb, values = JobStatus.QUEUED, "re-queued", _REQUEUED
        else:
            to, verb = JobStatus.FAILED, "failed"
            values = {"error": f"{reason}; the job was attempted {job.attempts} time(s) and is not retried again",
                      "error_type": "worker_died"}
        with self._begin() as c:  # the attempt count pins the view: a stale one changes nothing
            moved = _transition(c, job.id, to, from_=JobStatus.RUNNING, where=[jobs.c.attempts == job.attempts],
                                values=values, log_line=("warning", f"{reason}; job {verb} (attempt {job.attempts})"))
        return to if moved else None

    def release_job(self, job: JobRecord, reason: str) -> bool:
        """Put a running job back in the queue without spending an attempt (graceful shutdown)."""
        with self._begin() as c:
            return _transition(c, job.id, JobStatus.QUEUED, from_=JobStatus.RUNNING,
                               where=[jobs.c.attempts == job.attempts],
                               values={**_REQUEUED, "attempts": max(job.attempts - 1, 0)},
                               log_line=("info", f"{reason}; job returned to the queue")) is not None

    # ---- webhooks ------------------------------------------------------------------------------------

    def due_webhooks(self, now: float, limit: int = 20) -> list[JobRecord]:
        with self._connect() as c:
            return [JobRecord.from_row(r) for r in c.execute(
                jobs.select().where(jobs.c.webhook_status == WebhookStatus.PENDING, jobs.c.webhook_next_at <= now)
                .order_by(jobs.c.webhook_next_at).limit(limit)
            )]

    def webhook_attempted(self, job_id: str, *, delivered: bool, attempts: int, next_at: float | None,
                          log_line: str | None = None, level: str = "info") -> None:
        """Record a delivery attempt, and its log line in the same transaction (a stop between the two would
        leave the attempt counted but unexplained)."""
        status = (WebhookStatus.DELIVERED if delivered
                  else WebhookStatus.PENDING if next_at is not None else WebhookStatus.FAILED)
        now = time.time()
        with self._begin() as c:
            c.execute(jobs.update().where(jobs.c.id == job_id).values(
                webhook_status=status, webhook_attempts=attempts, webhook_next_at=next_at))
            if log_line:
                c.execute(job_logs.insert().values(job_id=job_id, ts=now, level=level, source="server",
                                                   message=log_line))

    # ---- retention -----------------------------------------------------------------------------------

    def expired_jobs(self, cutoff: float, limit: int = 500) -> list[str]:
        with self._connect() as c:
            return list(c.execute(
                sa.select(jobs.c.id).where(jobs.c.finished_at.is_not(None), jobs.c.finished_at < cutoff)
                .limit(limit)).scalars())

    def delete_jobs(self, ids: list[str]) -> None:
        if not ids:
            return
        with self._begin() as c:
            c.execute(job_logs.delete().where(job_logs.c.job_id.in_(ids)))
            c.execute(jobs.delete().where(jobs.c.id.in_(ids)))

    # ---- uploads -------------------------------------------------------------------------------------

    def insert_upload(self, *, upload_id: str, token: str, filename: str, content_type: str | None,
                      size: int | None, path: str, completed: bool, owner: str | None = None) -> None:
        now = time.time()
        with self._begin() as c:
            c.execute(uploads.insert().values(id=upload_id, token=token, filename=filename,
                                              content_type=content_type, size=size, path=path, created_at=now,
                                              completed_at=now if completed else None, owner=owner))

    def shared_secret(self, name: str) -> bytes:
        """The store-wide random secret `name`, created by whichever instance asks first (the primary key makes
        a concurrent second insert fail, and both then read the winner's value)."""
        q = sa.select(server_secrets.c.value).where(server_secrets.c.name == name)
        with self._connect() as c:
            value = c.execute(q).scalar()
        if value is None:
            with contextlib.suppress(sa.exc.IntegrityError), self._begin() as c:
                c.execute(server_secrets.insert().values(name=name, value=secrets.token_bytes(32)))
            with self._connect() as c:
                value = c.execute(q).scalar_one()
        return bytes(value)

    def get_upload(self, upload_id: str) -> dict[str, Any] | None:
        with self._connect() as c:
            row = c.execute(uploads.select().where(uploads.c.id == upload_id)).first()
        return dict(row._mapping) if row else None

    def complete_upload(self, upload_id: str, size: int) -> None:
        with self._begin() as c:
            c.execute(uploads.update().where(uploads.c.id == upload_id).values(completed_at=time.time(),
                                                                               size=size))

    def expired_uploads(self, cutoff: float, limit: int = 500) -> list[dict[str, Any]]:
        with self._connect() as c:
            return [dict(r._mapping) for r in c.execute(
                uploads.select().where(uploads.c.created_at < cutoff).limit(limit))]

    def delete_uploads(self, ids: list[str]) -> None:
        if ids:
            with self._begin() as c:
                c.execute(uploads.delete().where(uploads.c.id.in_(ids)))

    # ---- workers -------------------------------------------------------------------------------------

    def upsert_worker(self, worker_id: str, **values: Any) -> None:
        now = time.time()
        values.setdefault("heartbeat_at", now)
        with self._begin() as c:
            n = c.execute(workers.update().where(workers.c.id == worker_id).values(**values)).rowcount
            if not n:
                values.setdefault("started_at", now)
                values.setdefault("info", {})
                c.execute(workers.insert().values(id=worker_id, **values))

    def worker_heartbeat(self, worker_id: str, job_id: str | None, info: dict[str, Any] | None = None,
                         lease_s: float = 60.0) -> None:
        """Record the worker as alive and renew the lease on its running job for another `lease_s` seconds."""
        now = time.time()
        vals: dict[str, Any] = {"heartbeat_at": now, "current_job": job_id}
        if info is not None:
            vals["info"] = info
        with self._begin() as c:
            c.execute(workers.update().where(workers.c.id == worker_id).values(**vals))
            if job_id:
                c.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.worker_id == worker_id,
                                              jobs.c.status == JobStatus.RUNNING)
                          .values(heartbeat_at=now, lease_expires_at=now + lease_s))

    def list_workers(self, instance: str | None = None) -> list[dict[str, Any]]:
        """The current worker of each slot (the most recently started), ordered by slot."""
        q = workers.select().order_by(workers.c.slot, workers.c.started_at)
        if instance is not None:
            q = q.where(workers.c.instance == instance)
        latest: dict[tuple[str, int], dict[str, Any]] = {}
        with self._connect() as c:
            for r in c.execute(q):
                latest[(r.instance, r.slot)] = dict(r._mapping)
        return sorted(latest.values(), key=lambda w: (w["slot"], w["started_at"]))

    def get_worker(self, worker_id: str) -> dict[str, Any] | None:
        with self._connect() as c:
            row = c.execute(workers.select().where(workers.c.id == worker_id)).first()
        return dict(row._mapping) if row else None

    def delete_workers_of(self, instance: str | None) -> None:
        """Forget the worker rows a previous run of this instance left (None: every row, for a store with one
        server); other instances' rows are theirs."""
        q = workers.delete() if instance is None else workers.delete().where(workers.c.instance == instance)
        with self._begin() as c:
            c.execute(q)

    # ---- stage statistics (Prometheus histograms, monotonic across restarts) --------------------------

    def observe_stages(self, slot: int, timings: dict[str, float]) -> None:
        """Add one job's stage durations; each worker slot owns its rows, so there is a single writer."""
        with self._connect() as c:  # read outside the write transaction: no snapshot upgrade on SQLite
            existing = {r.stage: r for r in c.execute(stage_stats.select().where(stage_stats.c.slot == slot))}
        with self._begin() as c:
            for stage, secs in timings.items():
                row = existing.get(stage)
                buckets = list(row.buckets) if row is not None else [0] * len(STAGE_BUCKETS)
                for i, le in enumerate(STAGE_BUCKETS):
                    if secs <= le:
                        buckets[i] += 1
                if row is None:
                    c.execute(stage_stats.insert().values(slot=slot, stage=stage, count=1, total=secs,
                                                          buckets=buckets))
                else:
                    c.execute(stage_stats.update()
                              .where(stage_stats.c.slot == slot, stage_stats.c.stage == stage)
                              .values(count=stage_stats.c.count + 1, total=stage_stats.c.total + secs,
                                      buckets=buckets))

    def stage_histograms(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        with self._connect() as c:
            for r in c.execute(stage_stats.select()):
                agg = out.setdefault(r.stage, {"count": 0, "total": 0.0, "buckets": [0] * len(STAGE_BUCKETS)})
                agg["count"] += r.count
                agg["total"] += r.total
                agg["buckets"] = [a + b for a, b in zip(agg["buckets"], r.buckets, strict=False)]
        return out

    # ---- several instances on one store: leases, webhook claims, singleton work ------------------------

    def expired_leases(self, now: float, legacy_timeout_s: float) -> list[JobRecord]:
        """Running jobs whose lease ran out (their worker stopped renewing it). A job claimed before leases
        existed (no `lease_expires_at`) falls back to its last heartbeat plus `legacy_timeout_s`."""
        with self._connect() as c:
            return [JobRecord.from_row(r) for r in c.execute(jobs.select().where(
                jobs.c.status == JobStatus.RUNNING,
                sa.or_(jobs.c.lease_expires_at < now,
                       sa.and_(jobs.c.lease_expires_at.is_(None), jobs.c.heartbeat_at < now - legacy_timeout_s)),
            ))]

    def running_jobs_of_instance(self, instance: str) -> list[JobRecord]:
        """Running jobs claimed by any worker of `instance` (this run's or a previous run's)."""
        own = sa.select(workers.c.id).where(workers.c.instance == instance)
        with self._connect() as c:
            return [JobRecord.from_row(r) for r in c.execute(
                jobs.select().where(jobs.c.status == JobStatus.RUNNING, jobs.c.worker_id.in_(own)))]

    def claim_webhook(self, job: JobRecord, until: float) -> bool:
        """Take the delivery of `job`'s webhook until `until`: a conditional update on the state this instance
        read, so of several instances that saw the same due webhook exactly one wins."""
        cond = [jobs.c.id == job.id, jobs.c.webhook_status == WebhookStatus.PENDING,
                jobs.c.webhook_attempts == job.webhook_attempts]
        cond.append(jobs.c.webhook_next_at.is_(None) if job.webhook_next_at is None
                    else jobs.c.webhook_next_at == job.webhook_next_at)
        with self._begin() as c:
            return c.execute(jobs.update().where(*cond).values(webhook_next_at=until)).rowcount == 1

    @contextlib.contextmanager
    def singleton(self, name: str) -> Iterator[bool]:
        """Yields True in at most one instance at a time (a PostgreSQL advisory lock, not waited for); on
        SQLite, whose store has a single server, always True."""
        if not self.is_postgres:
            yield True
            return
        key = zlib.crc32(f"vace:{name}".encode())
        with self._connect() as c:
            got = bool(c.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            c.commit()
            try:
                yield got
            finally:
                if got:
                    c.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    c.commit()
