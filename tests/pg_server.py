"""A throw-away PostgreSQL cluster for the tests: `initdb` + `pg_ctl` in a temp dir, on a free loopback port.

Debian's `postgresql` package provides the binaries (`scripts/setup.sh` installs it when it can). `initdb`
refuses to run as root, so as root the cluster belongs to the `postgres` system user (created by the
package), else to a `vacepg` user made here; as any other user it is simply ours. Trust auth on loopback
only: the cluster lives for one pytest session and is deleted afterwards.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

SUPERUSER = "vace"


def pg_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin dir (Debian keeps `initdb` off PATH), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> str | None:
    """The user to run the cluster as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "vacepg"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "vacepg"],
                   check=True, capture_output=True)
    return "vacepg"


class PgCluster:
    """One running cluster; `url(db)` gives a SQLAlchemy URL, `create_database()` a fresh empty database."""

    def __init__(self) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL binaries not found (install Debian's 'postgresql' package)")
        self.bindir = bindir
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="vace-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.log = self.root / "server.log"
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *args] if self.user else list(args)

    def start(self) -> PgCluster:
        subprocess.run(self._cmd(str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                                 "--auth=trust", "--encoding=UTF8", "--no-sync"),
                       check=True, capture_output=True, cwd=self.root)
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o",
                                 opts, "-w", "-t", "60", "start"), check=True, capture_output=True, cwd=self.root)
        return self

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{db}"

    def create_database(self) -> str:
        """A new empty database (tests never see each other's rows); returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres",
                             autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                                 "stop"), capture_output=True, cwd=self.root)
        for _ in range(20):
            try:
                shutil.rmtree(self.root)
                return
            except OSError:
                time.sleep(0.1)


def unavailable_reason() -> str | None:
    """Why a PostgreSQL test cannot run here, or None when it can."""
    if pg_bindir() is None:
        return "PostgreSQL is not installed (scripts/setup.sh installs Debian's 'postgresql' as root)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed (pip install 'vace-local[postgres]')"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without 'runuser' (initdb refuses root)"
    return None
