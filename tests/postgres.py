"""A real PostgreSQL server for the tests, started by the suite itself.

``PostgresServer.start()`` runs ``initdb`` into a fresh temporary directory and ``pg_ctl
start`` on a free loopback port (password authentication over TCP, the unix socket inside
the directory, so nothing of the machine's own PostgreSQL is touched).  ``initdb`` refuses
to run as root, so as root (CI) every command runs as the ``postgres`` user through
``runuser``.  ``stop()`` / ``start()`` again restart the same cluster (the tests stop the
database mid-run); ``destroy()`` removes it.

The binaries are looked up in ``$GLMSERVE_PG_BIN``, ``/usr/lib/postgresql/*/bin``, then
``$PATH``; :func:`pg_bin` skips the test (naming what is missing) only when there are none.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from servers import free_port

PASSWORD = "glmserve-test-pw"


def pg_bin() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``."""
    env = os.environ.get("GLMSERVE_PG_BIN")
    candidates = [env] if env else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    which = shutil.which("initdb")
    if which:
        candidates.append(str(Path(which).parent))
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found in $GLMSERVE_PG_BIN, "
                "/usr/lib/postgresql/*/bin or $PATH: apt-get install postgresql")


class PostgresServer:
    def __init__(self) -> None:
        self.bin = pg_bin()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run initdb as")
        self.dir = Path(tempfile.mkdtemp(prefix="glmserve-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        if self.as_root:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        pwfile = self.dir / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_root:
            os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "glmserve", "--auth-local=trust", "--auth-host=scram-sha-256",
                  f"--pwfile={pwfile}", "-E", "UTF8", "--no-instructions", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.dir}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 60\n"
                    "shared_buffers = 16MB\n")

    @property
    def url(self) -> str:
        return f"postgresql://glmserve:{PASSWORD}@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if r.returncode != 0:
            raise RuntimeError(f"{tool} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{self.log()}")
        return r

    def log(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self) -> "PostgresServer":
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        cmd = [str(self.bin / "pg_ctl"), "-D", str(self.data), "status"]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0

    def destroy(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def fresh_database(self, name: str) -> str:
        """A new empty database's URL (each test module gets its own)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + "/" + name
