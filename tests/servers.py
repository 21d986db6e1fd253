"""Real servers for the tests: a throwaway PostgreSQL cluster and a `chroma run` server.

PostgreSQL refuses to run as root, so as root the cluster belongs to `nobody` (`runuser`);
as anyone else it runs as that user. The binaries come from PATH or Debian's
/usr/lib/postgresql/<version>/bin (scripts/test.sh installs the `postgresql` package).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

__all__ = ["ChromaServer", "PostgresCluster", "free_port"]

_PG_USER = "upc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if not versions:
        raise RuntimeError(
            f"PostgreSQL's {name} was not found: install the `postgresql` package "
            "(scripts/test.sh does)"
        )
    return str(versions[-1])


class PostgresCluster:
    """initdb in a temp dir, one server on a free localhost port, trust auth for `upc`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="upc-pg-"))
        self.port = free_port()
        self._as_other = os.geteuid() == 0
        self.root.chmod(0o755)
        if self._as_other:
            shutil.chown(self.root, user="nobody")
        self.data = self.root / "data"

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "nobody", "--"] if self._as_other else []
        done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed:\n{done.stdout}\n{done.stderr}")

    def start(self) -> PostgresCluster:
        self._run(
            _pg_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            _PG_USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        # Durability is pointless for a throwaway cluster; speed is not.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=400"
        )
        log = self.root / "server.log"
        self._run(
            _pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(log), "-w", "start"
        )
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{_PG_USER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(sql)

    def create_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        self._admin(f"CREATE DATABASE {name} STRATEGY FILE_COPY")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def checkpoint(self) -> None:
        self._admin("CHECKPOINT")

    def relation_files(self, url: str, table: str) -> list[Path]:
        """The on-disk files of `table`, its TOAST table and their indexes (for erasure)."""
        import psycopg

        with psycopg.connect(url) as con:
            rows = con.execute(
                "SELECT pg_relation_filepath(c.oid) FROM pg_class c WHERE c.oid IN ("
                " SELECT %(t)s::regclass UNION SELECT reltoastrelid FROM pg_class"
                " WHERE oid = %(t)s::regclass AND reltoastrelid <> 0"
                " UNION SELECT indexrelid FROM pg_index WHERE indrelid = %(t)s::regclass)",
                {"t": table},
            ).fetchall()
        files: list[Path] = []
        for (relative,) in rows:
            base = self.data / relative
            files.extend(p for p in base.parent.glob(base.name + "*") if p.is_file())
        return files

    def stop(self) -> None:
        try:
            self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class ChromaServer:
    """`chroma run` on a free localhost port; stop and start again keep its data dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "chroma-server"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ChromaServer:
        chroma = Path(sys.executable).parent / "chroma"
        log = (self.root / f"chroma-{self.port}.log").open("ab")
        args = ["run", "--path", str(self.path), "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [str(chroma), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chroma run exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/api/v2/heartbeat", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("chroma run did not start")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
