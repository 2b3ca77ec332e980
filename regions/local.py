"""The local deployment behind ``meshbank up``: one supervisor process that owns everything.

The supervisor starts PostgreSQL (its own data directory under the state folder, not
the system service), applies the migrations, starts the services as child processes,
seeds the demo principals and accounts, restarts a service that crashes (with
backoff), and on SIGTERM stops the services and then PostgreSQL. ``meshbank down``
sends that SIGTERM. Everything it knows is in the state folder:

    state/secrets.json   database password, key passphrase, demo credentials (0600)
    state/supervisor.pid the supervisor's PID while it runs
    state/status.json    processes, PIDs, health and endpoints, rewritten every second
    state/logs/          one log per process
    state/postgres/      the data directory (kept across up/down)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from regions import migrate
from regions.postgres import PostgresNode

log = logging.getLogger(__name__)

SERVICES = ("auth", "account", "transfer")


class LocalError(RuntimeError):
    """The local deployment cannot be started or reached."""


def state_dir() -> Path:
    return Path(os.environ.get("MESHBANK_STATE_DIR", Path.cwd() / ".meshbank")).resolve()


@dataclass(frozen=True)
class Ports:
    """The local port plan: PostgreSQL and one port per service, from one base."""

    postgres: int
    services: Mapping[str, int]

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Ports:
        raw = env.get("MESHBANK_BASE_PORT", "55400")
        if not raw.isdigit() or not 1024 <= int(raw) <= 65000:
            raise LocalError(f"MESHBANK_BASE_PORT={raw!r} must be a number between 1024 and 65000")
        base = int(raw)
        return cls(postgres=base + 32, services={s: base + 51 + i for i, s in enumerate(SERVICES)})


def load_secrets(state: Path) -> dict[str, str]:
    """The deployment's generated secrets, created on first use (file mode 0600)."""
    path = state / "secrets.json"
    if path.exists():
        data: dict[str, str] = json.loads(path.read_text())
        return data
    state.mkdir(parents=True, exist_ok=True)
    data = {
        "database_password": secrets.token_urlsafe(24),
        "key_passphrase": secrets.token_urlsafe(32),
    }
    save_secrets(state, data)
    return data


def save_secrets(state: Path, data: Mapping[str, str]) -> None:
    path = state / "secrets.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(data), f, indent=2)
    tmp.replace(path)


def postgres_node(state: Path, ports: Ports, secret: Mapping[str, str]) -> PostgresNode:
    return PostgresNode(state / "postgres", ports.postgres, secret["database_password"])


def service_env(
    service: str, ports: Ports, node: PostgresNode, secret: Mapping[str, str]
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MESHBANK_DATABASE_URL=node.url(),
        MESHBANK_LISTEN_ADDRESS=f"127.0.0.1:{ports.services[service]}",
        MESHBANK_INSTANCE_ID=f"local-{service}-1",
    )
    if service == "auth":
        env["MESHBANK_KEY_PASSPHRASE"] = secret["key_passphrase"]
    return env


def grpc_healthy(address: str, service: str = "", timeout: float = 1.0) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Child:
    """A supervised service process, restarted with backoff when it dies."""

    name: str
    argv: list[str]
    env: dict[str, str]
    address: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def poll(self) -> None:
        """Restart the process if it exited: 0.5 s, 1 s, 2 s ... up to 10 s between tries."""
        if self.process is not None and self.process.poll() is None:
            if time.monotonic() - self.started_at > 30:
                self.restarts = 0  # it has been stable: reset the backoff
            return
        now = time.monotonic()
        if self.process is not None:
            log.warning("%s exited with %s", self.name, self.process.returncode)
            self.process = None
            self.next_start = now + min(10.0, 0.5 * 2**self.restarts)
            self.restarts += 1
        if now >= self.next_start:
            self.start()

    def stop(self, grace: float) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Supervisor:
    """Owns PostgreSQL and the services for as long as it runs."""

    def __init__(self, state: Path, ports: Ports) -> None:
        self.state = state
        self.ports = ports
        self.secrets = load_secrets(state)
        self.node = postgres_node(state, ports, self.secrets)
        (state / "logs").mkdir(parents=True, exist_ok=True)
        self.children = [
            Child(
                name=service,
                argv=[sys.executable, "-m", "services.cli", "serve", service],
                env=service_env(service, ports, self.node, self.secrets),
                address=f"127.0.0.1:{ports.services[service]}",
                log_path=state / "logs" / f"{service}.log",
            )
            for service in SERVICES
        ]
        self._stop = threading.Event()

    def run(self) -> None:
        pid_file = self.state / "supervisor.pid"
        pid_file.write_text(str(os.getpid()))
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        try:
            self._write_status(phase="starting")
            self.node.init()
            self.node.start()
            self.node.create_database("meshbank")
            migrate.upgrade(self.node.url())
            for child in self.children:
                child.start()
            seeded = False
            while not self._stop.is_set():
                if self.node.process is not None and self.node.process.poll() is not None:
                    log.warning("postgres exited; restarting")
                    self.node.process = None
                    self.node.start()
                for child in self.children:
                    child.poll()
                healthy = self._write_status(phase="running" if seeded else "seeding")
                if not seeded and healthy:
                    from services.seed import seed_demo  # imported late: needs the stubs

                    self.secrets = seed_demo(self.state, self.secrets, self.endpoints())
                    seeded = True
                    self._write_status(phase="running")
                self._stop.wait(1.0)
        except Exception:
            log.exception("supervisor failed")
            self._write_status(phase="failed")
            raise
        finally:
            log.info("stopping services and postgres")
            for child in self.children:
                child.stop(grace=15.0)
            self.node.stop()
            pid_file.unlink(missing_ok=True)
            self._write_status(phase="stopped")

    def endpoints(self) -> dict[str, str]:
        return {
            **{f"{c.name}_grpc": c.address for c in self.children},
            "postgres": f"127.0.0.1:{self.ports.postgres}",
        }

    def _write_status(self, phase: str) -> bool:
        processes: list[dict[str, Any]] = []
        node_proc = self.node.process
        processes.append(
            {
                "region": "local",
                "role": "db",
                "service": "postgres",
                "pid": node_proc.pid if node_proc else None,
                "healthy": node_proc is not None and node_proc.poll() is None,
            }
        )
        for child in self.children:
            proc = child.process
            alive = proc is not None and proc.poll() is None
            processes.append(
                {
                    "region": "local",
                    "role": "service",
                    "service": child.name,
                    "pid": proc.pid if proc else None,
                    "healthy": alive and grpc_healthy(child.address),
                    "restarts": child.restarts,
                }
            )
        status = {
            "phase": phase,
            "supervisor_pid": os.getpid(),
            "regions": ["local"],
            "processes": processes,
            "endpoints": self.endpoints(),
        }
        tmp = self.state / "status.json.tmp"
        tmp.write_text(json.dumps(status, indent=2))
        tmp.replace(self.state / "status.json")
        return all(p["healthy"] for p in processes)


def read_status(state: Path) -> dict[str, Any] | None:
    path = state / "status.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def supervisor_pid(state: Path) -> int | None:
    path = state / "supervisor.pid"
    if not path.exists():
        return None
    pid = int(path.read_text().strip() or 0)
    return pid if pid and pid_alive(pid) else None


def start_detached(state: Path, timeout: float = 180.0) -> dict[str, Any]:
    """Start the supervisor in its own session and wait until every process is healthy."""
    if supervisor_pid(state) is None:
        state.mkdir(parents=True, exist_ok=True)
        (state / "status.json").unlink(missing_ok=True)
        with open(state / "supervisor.log", "ab") as out:
            subprocess.Popen(
                [sys.executable, "-m", "services.cli", "up"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=dict(os.environ, MESHBANK_STATE_DIR=str(state)),
            )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = read_status(state)
        if status and status["phase"] == "running":
            return status
        if status and status["phase"] == "failed":
            break
        time.sleep(0.5)
    tail = (state / "supervisor.log").read_text(errors="replace").splitlines()[-30:]
    raise LocalError(
        "meshbank did not become healthy; supervisor.log ends with:\n" + "\n".join(tail)
    )


def stop(state: Path, timeout: float = 60.0) -> bool:
    """SIGTERM the supervisor and wait for it (and so every child) to exit."""
    pid = supervisor_pid(state)
    if pid is None:
        _kill_leftovers(state)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.2)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    _kill_leftovers(state)
    return True


def _kill_leftovers(state: Path) -> None:
    """Kill any process the status file still lists (after a supervisor crash)."""
    status = read_status(state)
    if not status:
        return
    for proc in status.get("processes", []):
        pid = proc.get("pid")
        if pid and pid_alive(pid):
            log.warning("killing leftover %s (pid %d)", proc.get("service"), pid)
            os.kill(pid, signal.SIGKILL)
