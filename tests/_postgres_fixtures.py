"""A throwaway PostgreSQL server for the catalog tests, started by the test session itself
(`benchmarks._postgres.throwaway_postgres`, fsync off). Skipped where neither the server nor the Python
driver (psycopg 3: `pip install 'robret[postgres]'`) can be had.

`postgres_server.create_database()` makes a fresh database; `postgres_server.url(name)` is its
SQLAlchemy URL without the password (libpq then reads PGPASSWORD or ~/.pgpass), `url(name, PASSWORD)`
with it.
"""
from __future__ import annotations

import contextlib

import pytest

from benchmarks._postgres import PASSWORD, PostgresServer, Unavailable, throwaway_postgres

__all__ = ["PASSWORD", "PostgresServer", "postgres_server"]


@pytest.fixture(scope="session")
def postgres_server():
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(throwaway_postgres(fsync=False))
        except Unavailable as exc:
            pytest.skip(str(exc))
        yield server
