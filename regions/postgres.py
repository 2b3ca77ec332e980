"""One local PostgreSQL server (Debian's binaries) owned by the process that starts it.

Used by ``meshbank up`` and by the integration-test fixture. The server runs in its
own session so a terminal's signals do not reach it, and is stopped by PID. As root,
it runs as the ``postgres`` user through ``setpriv`` (``runuser`` SIGKILLs its child
after 2 s, DESIGN.md).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

PG_BIN = Path(os.environ.get("MESHBANK_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "meshbank"


class PostgresError(RuntimeError):
    """PostgreSQL could not be initialised, started or reached."""


def run_as_postgres() -> list[str]:
    """The command prefix that drops root privileges to the postgres user, if needed."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]


def chown_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _check_binaries() -> None:
    for name in ("initdb", "postgres"):
        if not (PG_BIN / name).exists():
            raise PostgresError(
                f"{PG_BIN / name} not found: install Debian's postgresql-15 "
                "(tools/bootstrap.sh does) or set MESHBANK_PG_BIN"
            )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError as exc:
            raise PostgresError(
                "running as root needs the 'postgres' user (postgresql-15)"
            ) from exc


@dataclass
class PostgresNode:
    """A PostgreSQL data directory and, while running, its server process."""

    base_dir: Path
    port: int
    password: str
    host: str = "127.0.0.1"
    durable: bool = True
    settings: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgres.log"

    def url(self, database: str = "meshbank", driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{SUPERUSER}:{self.password}@{self.host}:{self.port}/{database}"

    def dsn(self, database: str = "meshbank") -> str:
        return self.url(database, driver="postgresql")

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """Create the data directory (once); the superuser gets ``password`` (SCRAM)."""
        _check_binaries()
        if self.initialised():
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        chown_to_postgres(self.base_dir)
        pwfile = self.base_dir / ".pwfile"
        pwfile.write_text(self.password)
        pwfile.chmod(0o600)
        chown_to_postgres(pwfile)
        try:
            result = subprocess.run(
                [
                    *run_as_postgres(),
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pwfile}",
                    "-A",
                    "scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    # Checksums catch disk corruption; tests skip the fsyncs instead.
                    "--data-checksums" if self.durable else "--no-sync",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise PostgresError(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def _command(self) -> list[str]:
        settings = {
            "port": str(self.port),
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.base_dir),
            "max_connections": "200",
            "shared_buffers": "256MB",
            "logging_collector": "off",
            **({} if self.durable else {"fsync": "off", "full_page_writes": "off"}),
            **self.settings,
        }
        # The server dies with the process that started it (a test runner killed before
        # its finalizers run leaves no postgres holding a port). The signal is set in the
        # same setpriv that drops privileges: a uid change clears an earlier one.
        drop = run_as_postgres() or ["setpriv", "--"]
        prefix = [drop[0], "--pdeathsig", "KILL", *drop[1:]]
        args = [*prefix, str(PG_BIN / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        return args

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it accepts connections."""
        if self.process is not None and self.process.poll() is None:
            return
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        try:
            self.process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise PostgresError(
                    f"postgres exited with {self.process.returncode}; see {self.log_path}:\n"
                    + self.log_tail()
                )
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.1)
        raise PostgresError(f"postgres not ready after {timeout}s: {last}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def create_database(self, name: str, template: str | None = None) -> None:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if exists:
                return
            query = f'CREATE DATABASE "{name}"'
            if template:
                query += f' TEMPLATE "{template}"'
            conn.execute(query.encode())

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: roll back sessions, checkpoint); SIGKILL if it hangs."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)
