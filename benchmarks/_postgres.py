"""A throwaway PostgreSQL server: a cluster made with Debian's `initdb` in a temporary directory,
listening only on a Unix socket there (no TCP port), password authentication (scram-sha-256) for a
superuser `robret`. As root the server runs as the `postgres` user (PostgreSQL refuses to run as root),
and Debian's `postgresql` package is installed with apt-get when no `initdb` is found. Used by the test
session (tests/_postgres_fixtures.py, fsync off) and by benchmarks/catalog_commit.py (fsync on, as a
user's server runs). `Unavailable` says why none could be started.

`PostgresServer.create_database()` makes a fresh database; `url(name)` is its SQLAlchemy URL without the
password (libpq then reads PGPASSWORD or ~/.pgpass), `url(name, PASSWORD)` with it.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import itertools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

PASSWORD = "pg-test-s3cret"
_counter = itertools.count()


class Unavailable(RuntimeError):
    """No PostgreSQL server can be started here (the reason is the message)."""


@dataclass
class PostgresServer:
    socket_dir: str
    port: int
    user: str = "robret"

    def url(self, database: str, password: str | None = None) -> str:
        auth = self.user if password is None else f"{self.user}:{password}"
        return f"postgresql+psycopg://{auth}@/{database}?host={self.socket_dir}&port={self.port}"

    def create_database(self) -> str:
        import psycopg

        name = f"robret_test_{os.getpid()}_{next(_counter)}"
        with psycopg.connect(host=self.socket_dir, port=self.port, user=self.user, password=PASSWORD,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name


def _bindir() -> str | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return os.path.dirname(os.path.realpath(found)) if found else None


def _install_postgres() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], env=env, capture_output=True, timeout=900)


@contextlib.contextmanager
def throwaway_postgres(fsync: bool = False):
    """Start a server (module doc), yield its PostgresServer, stop it and delete its files afterwards."""
    if importlib.util.find_spec("psycopg") is None:
        raise Unavailable("the PostgreSQL driver is missing: pip install 'robret[postgres]'")
    bindir = _bindir()
    if bindir is None:
        _install_postgres()
        bindir = _bindir()
    if bindir is None:
        raise Unavailable("no PostgreSQL server binaries (Debian: apt-get install postgresql)")
    as_user: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            raise Unavailable("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = tempfile.mkdtemp(prefix="robret-pg-")
    if as_user:
        shutil.chown(base, "postgres", "postgres")
    os.chmod(base, 0o755)
    data, sock = os.path.join(base, "data"), base
    pwfile = os.path.join(base, "pw")
    with open(pwfile, "w") as f:
        f.write(PASSWORD + "\n")
    if as_user:
        shutil.chown(pwfile, "postgres", "postgres")
    run = lambda *cmd: subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)  # noqa: E731
    done = run(os.path.join(bindir, "initdb"), "-D", data, "-U", "robret", "--auth=scram-sha-256",
               f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync")
    if done.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise Unavailable(f"initdb failed: {done.stderr[-500:]}")
    port = 5432 + os.getpid() % 1000
    done = run(os.path.join(bindir, "pg_ctl"), "-D", data, "-w", "-l", os.path.join(base, "log"), "-o",
               f"-k {sock} -c listen_addresses='' -p {port} -c fsync={'on' if fsync else 'off'}", "start")
    if done.returncode != 0:
        log = open(os.path.join(base, "log")).read()[-1000:] if os.path.exists(os.path.join(base, "log")) else ""
        shutil.rmtree(base, ignore_errors=True)
        raise Unavailable(f"PostgreSQL did not start: {done.stderr[-500:]} {log}")
    try:
        yield PostgresServer(sock, port)
    finally:
        run(os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)
