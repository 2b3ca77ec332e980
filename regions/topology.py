"""The deployment topology (``regions/topology.yaml``), loaded and validated.

Everything else (Envoy configs, processes, ports, Kubernetes manifests) is derived from
this model, so its checks are the place where a bad topology is stopped with a clear
message: an unknown region in a failover list, a port clash, zero replicas, ...
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from regions.k8s_settings import KubernetesSettings
from regions.k8s_settings import parse as parse_kubernetes

DEFAULT_TOPOLOGY = Path(__file__).resolve().parent / "topology.yaml"
SERVICE_NAMES = ("auth", "account", "transfer")
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
# A host name a certificate can name and a client can send as SNI (lower case).
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
PORTS_PER_INSTANCE = 6


class TopologyError(ValueError):
    """The topology file is not a deployable topology; the message lists every problem."""


@dataclass(frozen=True)
class Region:
    name: str
    index: int
    zones: tuple[str, ...]
    failover: tuple[str, ...]

    @property
    def preference(self) -> tuple[str, ...]:
        """This region first, then its failover order: priority 0, 1, 2, ..."""
        return (self.name, *self.failover)


@dataclass(frozen=True)
class Instance:
    """One replica of one service in one region, with its ports."""

    region: str
    zone: str
    service: str
    replica: int
    service_port: int
    inbound_port: int
    db_primary_port: int
    db_replica_port: int
    admin_port: int
    metrics_port: int  # the service's Prometheus /metrics

    @property
    def name(self) -> str:
        return f"{self.region}-{self.service}-{self.replica}"

    @property
    def identity(self) -> str:
        return service_identity(self.region, self.service)


def service_identity(region: str, service: str) -> str:
    return f"spiffe://meshbank/region/{region}/service/{service}"


def edge_identity(region: str) -> str:
    return f"spiffe://meshbank/region/{region}/edge"


@dataclass(frozen=True)
class Quota:
    """A token bucket: ``burst`` requests at once, ``refill`` more every ``interval_seconds``."""

    burst: int
    refill: int
    interval_seconds: int


@dataclass(frozen=True)
class EdgeTls:
    """The public listeners' certificate (``edge.tls`` of the topology).

    By default each edge and the global entry get a certificate from the local CA
    (``mesh/pki.py``) naming ``localhost``, the loopback addresses, the listener's own
    address and ``extra_names``. With ``cert_file``/``key_file``/``ca_file`` every
    public listener serves that certificate instead (one covering every partner-facing
    name), and the global entry and the edges' JWKS fetch verify it against
    ``ca_file`` by ``server_name``. The files are checked at start (mesh/public_tls.py).
    """

    extra_names: tuple[str, ...] = ()
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    server_name: str | None = None

    @property
    def own_certificate(self) -> bool:
        return self.cert_file is not None


# The share of requests traced when the topology does not say. Every span is exported and
# ingested: tracing every request cost the local deployment a third of its transfer
# throughput (docs/benchmarks.md), and production collectors are sized for a sample.
DEFAULT_TRACE_SAMPLE_PERCENT = 10.0


@dataclass(frozen=True)
class EdgePolicy:
    """What every edge enforces on partner traffic (the ``edge`` section of the topology).

    The quotas are token buckets kept by each edge for itself (Envoy's local rate
    limit): a partner whose calls are spread over the three edges gets up to three
    times its quota. Production would use a global rate limit service instead.
    """

    # Per token subject (``partners/{client_id}`` or ``users/{name}``).
    partner: Quota = Quota(burst=1000, refill=500, interval_seconds=1)
    # Per client address, on Login and IssueClientToken (credential guessing).
    login: Quota = Quota(burst=20, refill=10, interval_seconds=10)
    max_request_bytes: int = 65536
    max_request_headers_kb: int = 16
    request_headers_timeout_seconds: int = 10
    request_timeout_seconds: int = 30
    stream_idle_timeout_seconds: int = 30
    tls: EdgeTls = EdgeTls()


@dataclass(frozen=True)
class Topology:
    regions: tuple[Region, ...]
    replicas: Mapping[str, int]
    ports: Mapping[str, int]
    default_location: str
    host: str = "127.0.0.1"
    # Per-region addresses when regions live in their own network namespaces
    # (``regions/netns.py``); a region not listed listens on ``host`` like before.
    region_hosts: Mapping[str, str] = field(default_factory=dict)
    # The network that region hosts and the root namespace share (pg_hba allows it).
    region_network: str | None = None

    def host_of(self, region: str) -> str:
        """Where ``region``'s processes listen and are reached (``host`` unless netns)."""
        return self.region_hosts.get(region, self.host)

    @property
    def shared_host(self) -> str:
        """Where every region reaches the processes they share (the trace collector).

        ``host``; with regions in network namespaces, the root namespace's address on
        their bridge (the network's first address, ``regions/netns.py``), because a
        namespace's own loopback is not the root namespace's.
        """
        if self.region_network is None:
            return self.host
        return str(ipaddress.ip_network(self.region_network)[1])

    # How `meshbank render k8s` maps this topology onto clusters (None: not described).
    kubernetes: KubernetesSettings | None = None
    edge: EdgePolicy = EdgePolicy()
    # Head sampling: the percentage of requests traced (the ``tracing`` section).
    trace_sample_percent: float = DEFAULT_TRACE_SAMPLE_PERCENT

    def region(self, name: str) -> Region:
        return next(r for r in self.regions if r.name == name)

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.regions)

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(s for s in SERVICE_NAMES if s in self.replicas)

    def instances(self) -> Iterator[Instance]:
        n = 0
        for region in self.regions:
            for service in self.services:
                for replica in range(1, self.replicas[service] + 1):
                    base = self.ports["instances"] + PORTS_PER_INSTANCE * n
                    yield Instance(
                        region=region.name,
                        zone=region.zones[(replica - 1) % len(region.zones)],
                        service=service,
                        replica=replica,
                        service_port=base,
                        inbound_port=base + 1,
                        db_primary_port=base + 2,
                        db_replica_port=base + 3,
                        admin_port=base + 4,
                        metrics_port=base + 5,
                    )
                    n += 1

    def global_port(self, location: str) -> int:
        return self.ports["global"] + self.region(location).index

    def edge_port(self, region: str) -> int:
        return self.ports["edge"] + self.region(region).index

    def edge_admin_port(self, region: str) -> int:
        return self.ports["edge_admin"] + self.region(region).index

    def database_port(self, region: str) -> int:
        return self.ports["database"] + self.region(region).index

    def patroni_port(self, region: str) -> int:
        return self.ports["patroni"] + self.region(region).index

    def etcd_client_port(self, region: str) -> int:
        return self.ports["etcd_client"] + self.region(region).index

    def etcd_peer_port(self, region: str) -> int:
        return self.ports["etcd_peer"] + self.region(region).index

    @property
    def tracing_ui_port(self) -> int:
        """The tracing UI's HTTP port (Phoenix: UI, REST API and OTLP/HTTP)."""
        return self.ports["tracing_ui"]

    @property
    def tracing_otlp_port(self) -> int:
        """The trace collector's OTLP/gRPC port, where every Envoy and service exports."""
        return self.ports["tracing_otlp"]

    def prometheus_port(self) -> int:
        return self.ports["prometheus"]

    def auditor_port(self) -> int:
        """The ledger auditor's /metrics (the invariant check's results)."""
        return self.ports["auditor"]

    def all_ports(self) -> dict[int, str]:
        """Every port the deployment binds, with what binds it (for clash checks)."""
        used: dict[int, str] = {}
        claims: list[tuple[int, str]] = [
            (self.ports["global_admin"], "global entry admin"),
            (self.tracing_ui_port, "tracing UI"),
            (self.tracing_otlp_port, "trace collector (OTLP/gRPC)"),
        ]
        claims += [(self.prometheus_port(), "Prometheus"), (self.auditor_port(), "ledger auditor")]
        for r in self.regions:
            claims += [
                (self.global_port(r.name), f"global entry listener for {r.name}"),
                (self.edge_port(r.name), f"{r.name} edge"),
                (self.edge_admin_port(r.name), f"{r.name} edge admin"),
                (self.database_port(r.name), f"{r.name} PostgreSQL"),
                (self.patroni_port(r.name), f"{r.name} Patroni API"),
                (self.etcd_client_port(r.name), f"{r.name} etcd client"),
                (self.etcd_peer_port(r.name), f"{r.name} etcd peer"),
            ]
        for i in self.instances():
            claims += [
                (i.service_port, f"{i.name} service"),
                (i.inbound_port, f"{i.name} sidecar inbound"),
                (i.db_primary_port, f"{i.name} sidecar database primary outbound"),
                (i.db_replica_port, f"{i.name} sidecar database replica outbound"),
                (i.admin_port, f"{i.name} sidecar admin"),
                (i.metrics_port, f"{i.name} service metrics"),
            ]
        problems = []
        for port, what in claims:
            if port in used:
                problems.append(f"port {port} is used by both {used[port]} and {what}")
            elif not 1024 <= port <= 65535:
                problems.append(f"port {port} ({what}) is outside 1024-65535")
            used[port] = what
        if problems:
            raise TopologyError("port plan clashes:\n  " + "\n  ".join(problems))
        return used


def _problems_in(data: Any) -> tuple[list[str], dict[str, Any]]:
    problems: list[str] = []
    if not isinstance(data, dict):
        return ["the topology must be a mapping with regions, services and ports"], {}
    known = {"regions", "services", "ports", "default_location", "kubernetes", "edge", "tracing"}
    unknown = set(data) - known
    if unknown:
        problems.append(f"unknown top-level keys: {sorted(unknown)}")
    return problems, data


def _positive_int(raw: Any, where: str, problems: list[str], lo: int, hi: int) -> int | None:
    if not isinstance(raw, int) or isinstance(raw, bool) or not lo <= raw <= hi:
        problems.append(f"{where}: must be an integer between {lo} and {hi}, got {raw!r}")
        return None
    return raw


def _quota(raw: Any, where: str, default: Quota, problems: list[str]) -> Quota:
    if raw is None:
        return default
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a mapping with burst, refill and interval_seconds")
        return default
    unknown = set(raw) - {"burst", "refill", "interval_seconds"}
    if unknown:
        problems.append(f"{where}: unknown keys {sorted(unknown)}")
    values = {
        key: _positive_int(raw.get(key, getattr(default, key)), f"{where}.{key}", problems, 1, hi)
        for key, hi in (("burst", 1_000_000), ("refill", 1_000_000), ("interval_seconds", 3600))
    }
    burst, refill, interval = values["burst"], values["refill"], values["interval_seconds"]
    if burst is None or refill is None or interval is None:
        return default
    if refill > burst:
        # Envoy caps the bucket at max_tokens: a bigger refill would silently be the burst.
        problems.append(f"{where}: refill ({refill}) cannot exceed burst ({burst})")
    return Quota(burst, refill, interval)


def _edge_policy(raw: Any, problems: list[str]) -> EdgePolicy:
    """The optional ``edge`` section: quotas and request limits, defaults for what is absent."""
    default = EdgePolicy()
    if raw is None:
        return default
    if not isinstance(raw, dict):
        problems.append("edge: must be a mapping with quotas and limits")
        return default
    unknown = set(raw) - {"quotas", "limits", "tls"}
    if unknown:
        problems.append(f"edge: unknown keys {sorted(unknown)} (known: quotas, limits, tls)")
    quotas = raw.get("quotas") or {}
    limits = raw.get("limits") or {}
    if not isinstance(quotas, dict) or not isinstance(limits, dict):
        problems.append("edge.quotas and edge.limits must be mappings")
        return default
    for key in set(quotas) - {"partner", "login"}:
        problems.append(f"edge.quotas.{key}: unknown quota (known: partner, login)")
    bounds = {
        "max_request_bytes": (1024, 64 * 1024 * 1024),
        "max_request_headers_kb": (1, 96),  # Envoy's own ceiling is 8192; HTTP/2 peers ~96
        "request_headers_timeout_seconds": (1, 300),
        "request_timeout_seconds": (1, 3600),
        "stream_idle_timeout_seconds": (1, 3600),
    }
    for key in set(limits) - set(bounds):
        problems.append(f"edge.limits.{key}: unknown limit (known: {', '.join(bounds)})")
    values: dict[str, int] = {}
    for key, (lo, hi) in bounds.items():
        value = _positive_int(
            limits.get(key, getattr(default, key)), f"edge.limits.{key}", problems, lo, hi
        )
        values[key] = getattr(default, key) if value is None else value
    return EdgePolicy(
        partner=_quota(quotas.get("partner"), "edge.quotas.partner", default.partner, problems),
        login=_quota(quotas.get("login"), "edge.quotas.login", default.login, problems),
        tls=_edge_tls(raw.get("tls"), problems),
        **values,
    )


def _trace_sample_percent(raw: Any, problems: list[str]) -> float:
    """The optional ``tracing`` section: ``sample_percent``, 0-100 (a number)."""
    if raw is None:
        return DEFAULT_TRACE_SAMPLE_PERCENT
    if not isinstance(raw, dict):
        problems.append("tracing: must be a mapping with sample_percent")
        return DEFAULT_TRACE_SAMPLE_PERCENT
    unknown = set(raw) - {"sample_percent"}
    if unknown:
        problems.append(f"tracing: unknown keys {sorted(unknown)} (known: sample_percent)")
    value = raw.get("sample_percent", DEFAULT_TRACE_SAMPLE_PERCENT)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        problems.append(f"tracing.sample_percent: must be a number from 0 to 100, got {value!r}")
        return DEFAULT_TRACE_SAMPLE_PERCENT
    return float(value)


def _dns_or_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return bool(_DNS_NAME.match(name))
    return True


_TLS_FILES = ("cert_file", "key_file", "ca_file", "server_name")


def _edge_tls(raw: Any, problems: list[str]) -> EdgeTls:
    """``edge.tls``: extra names for the local CA's certificates, or one's own files.

    Only the shape is checked here; that the files exist, that the key matches the
    certificate and that the certificate names ``server_name`` is checked when the
    deployment starts (mesh/public_tls.py), where the files are read.
    """
    if raw is None:
        return EdgeTls()
    if not isinstance(raw, dict):
        problems.append("edge.tls: must be a mapping (extra_names, or cert_file, key_file, ...)")
        return EdgeTls()
    unknown = set(raw) - {"extra_names", *_TLS_FILES}
    if unknown:
        problems.append(
            f"edge.tls: unknown keys {sorted(unknown)} "
            f"(known: extra_names, {', '.join(_TLS_FILES)})"
        )
    extra = raw.get("extra_names") or []
    if not isinstance(extra, list) or not all(isinstance(n, str) and _dns_or_ip(n) for n in extra):
        problems.append("edge.tls.extra_names: a list of DNS names or IP addresses")
        extra = []
    given = {k: raw[k] for k in _TLS_FILES if raw.get(k) is not None}
    for key, value in given.items():
        if not isinstance(value, str) or not value:
            problems.append(f"edge.tls.{key}: must be a non-empty string")
        elif key != "server_name" and not Path(value).is_absolute():
            # Envoy and the clients run from other directories than the one reading this.
            problems.append(f"edge.tls.{key}: must be an absolute path, got {value!r}")
    if given and set(given) != set(_TLS_FILES):
        missing = sorted(set(_TLS_FILES) - set(given))
        problems.append(
            f"edge.tls: an own certificate needs all of {list(_TLS_FILES)}; missing {missing}"
        )
    if given and extra:
        problems.append(
            "edge.tls.extra_names: only for the local CA's certificates (not with cert_file)"
        )
    name = given.get("server_name")
    if isinstance(name, str) and not _DNS_NAME.match(name):
        problems.append(f"edge.tls.server_name: not a DNS name: {name!r}")
    files = {k: str(v) for k, v in given.items()} if set(given) == set(_TLS_FILES) else {}
    return EdgeTls(tuple(str(n) for n in extra), **files)


def parse(data: Any, source: str = "<topology>") -> Topology:
    """Validate a parsed YAML document and build the Topology, or raise TopologyError."""
    problems, data = _problems_in(data)
    regions_raw = data.get("regions") or {}
    if not isinstance(regions_raw, dict) or not regions_raw:
        problems.append("regions: at least one region is required")
        regions_raw = {}
    names = list(regions_raw)
    regions: list[Region] = []
    for index, (name, spec) in enumerate(regions_raw.items()):
        spec = spec or {}
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(f"regions.{name}: a name is lower-case letters, digits and '-'")
        zones = spec.get("zones") or []
        if not zones or not all(isinstance(z, str) and _NAME.match(z) for z in zones):
            problems.append(f"regions.{name}.zones: list at least one zone name")
        failover = spec.get("failover") or []
        for other in failover:
            if other not in names:
                problems.append(f"regions.{name}.failover: unknown region {other!r}")
            elif other == name:
                problems.append(f"regions.{name}.failover: a region cannot fail over to itself")
        if len(set(failover)) != len(failover):
            problems.append(f"regions.{name}.failover: lists a region twice")
        missing = set(names) - {name} - set(failover)
        if missing:
            problems.append(
                f"regions.{name}.failover: must order every other region; missing {sorted(missing)}"
            )
        regions.append(Region(str(name), index, tuple(zones), tuple(failover)))

    services_raw = data.get("services") or {}
    replicas: dict[str, int] = {}
    if not isinstance(services_raw, dict):
        problems.append("services: must be a mapping of service name to settings")
        services_raw = {}
    for service in SERVICE_NAMES:
        if service not in services_raw:
            problems.append(f"services.{service}: missing (every service must run)")
            continue
        count = (services_raw[service] or {}).get("replicas", 2)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            problems.append(
                f"services.{service}.replicas: must be a positive integer, got {count!r}"
            )
        elif count > 20:
            problems.append(f"services.{service}.replicas: at most 20 per region, got {count}")
        else:
            replicas[service] = count
    for service in set(services_raw) - set(SERVICE_NAMES):
        problems.append(f"services.{service}: unknown service (known: {', '.join(SERVICE_NAMES)})")

    ports_raw = data.get("ports") or {}
    ports: dict[str, int] = {}
    port_keys = (
        "global",
        "global_admin",
        "edge",
        "edge_admin",
        "database",
        "patroni",
        "etcd_client",
        "etcd_peer",
        "instances",
        "tracing_ui",
        "tracing_otlp",
        "prometheus",
        "auditor",
    )
    for key in port_keys:
        value = ports_raw.get(key) if isinstance(ports_raw, dict) else None
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"ports.{key}: an integer port is required")
        else:
            ports[key] = value

    default_location = data.get("default_location") or (names[0] if names else "")
    if names and default_location not in names:
        problems.append(f"default_location: unknown region {default_location!r}")
    kubernetes = parse_kubernetes(data.get("kubernetes"), names, SERVICE_NAMES, problems)

    edge = _edge_policy(data.get("edge"), problems)
    sample_percent = _trace_sample_percent(data.get("tracing"), problems)

    if problems:
        raise TopologyError(f"{source}:\n  " + "\n  ".join(problems))
    topology = Topology(
        tuple(regions),
        replicas,
        ports,
        default_location,
        kubernetes=kubernetes,
        edge=edge,
        trace_sample_percent=sample_percent,
    )
    try:
        topology.all_ports()
    except TopologyError as exc:
        raise TopologyError(f"{source}: {exc}") from None
    return topology


def load(path: Path | str | None = None) -> Topology:
    """Load the topology file (default: ``MESHBANK_TOPOLOGY`` or ``regions/topology.yaml``)."""
    import os

    path = Path(path or os.environ.get("MESHBANK_TOPOLOGY") or DEFAULT_TOPOLOGY)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TopologyError(f"cannot read the topology {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path} is not valid YAML: {exc}") from exc
    return parse(data, str(path))


def with_port_base(topology: Topology, base: int) -> Topology:
    """The same topology with every port shifted so the plan starts at ``base`` (tests)."""
    offset = base - min(topology.ports.values())
    shifted = replace(topology, ports={k: v + offset for k, v in topology.ports.items()})
    shifted.all_ports()
    return shifted


def with_region_hosts(
    topology: Topology, hosts: Mapping[str, str], network: str | None
) -> Topology:
    """The same topology with each region on its own address inside ``network``
    (``{}, None``: every region back on ``host``)."""
    unknown = sorted(set(hosts) - set(topology.region_names))
    if unknown:
        raise TopologyError(f"addresses given for unknown regions {unknown}")
    return replace(topology, region_hosts=dict(hosts), region_network=network)
