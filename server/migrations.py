"""Versioned schema migrations for the job store: a `schema_version` table and an ordered list of steps.

Why not Alembic: the store is a handful of tables in one module, every change so far is additive (a column, a
table, an index), and the server must upgrade its own database when it starts — a box with one GPU has no
separate "run the migrations" step. A numbered list of small functions, applied in order inside one transaction
under a lock and recorded one row per version, does exactly that without a migration environment, a script
directory or a second copy of the metadata to keep in step. Should a change ever need more (data rewrites,
downgrades), Alembic can take over from the recorded version number.

Rules for a new step: append `Migration(N + 1, …)` and change `server.store`'s tables to match, so a fresh
database (created from the tables, stamped with the latest version) and an upgraded one end up identical;
make the step safe to re-run (check before adding).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("vace.server.migrations")

schema_version = sa.Table(
    "schema_version",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(255), nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)

#: Key of the PostgreSQL advisory lock that serialises migrations between instances starting together.
_LOCK_KEY = 0x7ACE_0001


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    #: Applies the step; gets the store's tables as they are now (for steps that create a table).
    apply: Callable[[Connection, sa.MetaData], None]


def add_column(conn: Connection, table: str, column: sa.Column) -> None:
    """`ALTER TABLE … ADD COLUMN` unless the column is already there (re-runs and half-upgraded databases)."""
    if column.name in {c["name"] for c in sa.inspect(conn).get_columns(table)}:
        return
    ddl = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
    conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {ddl}")


def _create_table(conn: Connection, metadata: sa.MetaData, name: str) -> None:
    """Create one of the store's tables as it is defined now (a no-op when it exists)."""
    metadata.tables[name].create(conn, checkfirst=True)


def _create_index(conn: Connection, metadata: sa.MetaData, table: str, name: str) -> None:
    """Create one of the store's indexes as it is defined now (a no-op when it exists)."""
    next(i for i in metadata.tables[table].indexes if i.name == name).create(conn, checkfirst=True)


def _baseline(conn: Connection, metadata: sa.MetaData) -> None:
    """Version 1 is the schema before versioning existed; a database that has `jobs` already is at it."""


MIGRATIONS: list[Migration] = [
    Migration(1, "baseline: jobs, job_logs, workers, uploads, stage_stats", _baseline),
    Migration(2, "worker leases: jobs.lease_expires_at",
              lambda c, _: add_column(c, "jobs", sa.Column("lease_expires_at", sa.Float))),
    Migration(3, "owners: jobs.owner, uploads.owner (hash of the creating API key; NULL for older rows)",
              lambda c, _: (add_column(c, "jobs", sa.Column("owner", sa.String(64))),
                         add_column(c, "uploads", sa.Column("owner", sa.String(64))))),
    Migration(4, "server_secrets: store-wide secrets (the file-URL key every instance must share)",
              lambda c, md: _create_table(c, md, "server_secrets")),
    Migration(5, "structured errors: jobs.error_detail (the failed field and rule as data)",
              lambda c, _: add_column(c, "jobs", sa.Column("error_detail", sa.JSON))),
    Migration(6, "fair queueing: queue_turns (when each key was last served), index jobs(owner, status)",
              lambda c, md: (_create_table(c, md, "queue_turns"),
                             _create_index(c, md, "jobs", "ix_jobs_owner_status"))),
]
LATEST = MIGRATIONS[-1].version


def current_version(engine: Engine) -> int | None:
    """The recorded schema version (None: not a versioned store yet)."""
    with engine.connect() as c:
        if not sa.inspect(c).has_table("schema_version"):
            return None
        return c.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()


def upgrade(engine: Engine, metadata: sa.MetaData) -> list[int]:
    """Bring the database to `LATEST`: create a fresh one from `metadata`, or apply the missing steps to an
    existing one. Returns the versions applied now. Safe to call from several instances at once on PostgreSQL
    (an advisory lock serialises them); SQLite databases have one server by design."""
    applied: list[int] = []
    with engine.begin() as c:
        if c.dialect.name == "postgresql":
            c.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
        had_jobs = sa.inspect(c).has_table("jobs")
        schema_version.create(c, checkfirst=True)
        done = set(c.execute(sa.select(schema_version.c.version)).scalars())
        now = time.time()
        if not done and not had_jobs:  # a new database: the tables as they are now are the latest version
            metadata.create_all(c)
            c.execute(schema_version.insert(), [
                {"version": m.version, "description": m.description, "applied_at": now} for m in MIGRATIONS])
            return [m.version for m in MIGRATIONS]
        if not done:  # a store from before versioning: version 1
            c.execute(schema_version.insert().values(version=1, description=MIGRATIONS[0].description,
                                                     applied_at=now))
            done.add(1)
        for m in MIGRATIONS:
            if m.version in done:
                continue
            log.warning("job store: applying schema migration %d (%s)", m.version, m.description)
            m.apply(c, metadata)
            c.execute(schema_version.insert().values(version=m.version, description=m.description,
                                                     applied_at=time.time()))
            applied.append(m.version)
        newer = max(done | set(applied))
        if newer > LATEST:
            raise RuntimeError(f"the job store is at schema version {newer}, newer than this server "
                               f"understands ({LATEST}); upgrade vace-local")
    return applied
