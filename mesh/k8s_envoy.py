"""Envoy configs for Kubernetes, built by the same code as the local mesh.

``mesh.envoy`` builds every sidecar and edge for one machine: each listener and
endpoint on its own loopback port of the port plan. In Kubernetes the same proxies
listen on fixed ports inside their pods and reach each other by DNS names of Services.
Rather than thread a second addressing scheme through every builder, the local config
is built as it is (locality failover, retries, health checks, outlier detection, mTLS
all from one place) and then *re-addressed*: the port plan gives every listener and
endpoint a port of its own (``Topology.all_ports`` refuses clashes), so a port names
exactly one thing, and :class:`Addressing` maps it to where that thing is in a pod or
in a cluster. A port it does not know is an error, never left pointing at loopback.

Endpoints that become DNS names turn their cluster into ``STRICT_DNS``: a headless
Service resolves to every ready pod, so the edge still health-checks and ejects each
sidecar on its own, and the CockroachDB headless Service yields every node of a region.
Localities collapse from (region, zone) to region, since one Service spans the zones.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh import envoy
from regions.k8s_settings import KubernetesSettings
from regions.topology import Instance, Topology

Config = dict[str, Any]

COCKROACH_SERVICE = "cockroachdb"  # the headless Service of each region's nodes


@dataclass(frozen=True)
class PodPorts:
    """Fixed ports inside pods (pods do not share a network namespace, so no plan)."""

    service: int = 8080  # the gRPC service, on loopback only
    inbound: int = 8443  # the sidecar's mTLS listener: the only way in
    health: int = 15021  # the sidecar's plaintext probe listener (gRPC health only)
    admin: int = 9901  # Envoy admin, on loopback only
    db_primary: int = 26257  # sidecar outbound to the database, on loopback
    db_replica: int = 26258
    edge: int = 8080  # the edge's gRPC + REST/JSON listener
    cockroach_sql: int = 26257
    cockroach_http: int = 8080


POD = PodPorts()
LOOPBACK = "127.0.0.1"
ANY = "0.0.0.0"  # noqa: S104 - a pod's own network namespace; NetworkPolicies gate it


class AddressingError(ValueError):
    """A generated config refers to a port this module cannot place in Kubernetes."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @property
    def is_name(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return True
        return False


class Addressing:
    """Maps the local port plan to Kubernetes addresses.

    ``listen`` is where a proxy binds a port of the plan; ``connect`` is where a peer
    reaches the thing that owns it. They differ for a sidecar's inbound port, for
    instance: it binds 0.0.0.0:8443 in its pod, and edges reach it by Service name.
    """

    def __init__(self, listen: Mapping[int, Address], connect: Mapping[int, Address]) -> None:
        self.listen = dict(listen)
        self.connect = dict(connect)

    @classmethod
    def for_topology(cls, topology: Topology, settings: KubernetesSettings) -> Addressing:
        listen: dict[int, Address] = {}
        connect: dict[int, Address] = {}
        for i in topology.instances():
            listen[i.inbound_port] = Address(ANY, POD.inbound)
            listen[i.db_primary_port] = Address(LOOPBACK, POD.db_primary)
            listen[i.db_replica_port] = Address(LOOPBACK, POD.db_replica)
            listen[i.admin_port] = Address(LOOPBACK, POD.admin)
            connect[i.service_port] = Address(LOOPBACK, POD.service)
            connect[i.inbound_port] = Address(
                settings.service_dns(i.service, i.region), POD.inbound
            )
        for region in topology.region_names:
            listen[topology.edge_port(region)] = Address(ANY, POD.edge)
            listen[topology.edge_admin_port(region)] = Address(LOOPBACK, POD.admin)
            nodes = settings.service_dns(COCKROACH_SERVICE, region)
            connect[topology.database_port(region)] = Address(nodes, POD.cockroach_sql)
            connect[topology.patroni_port(region)] = Address(nodes, POD.cockroach_http)
            # The edge fetches the JWKS from its own listener (transcoded to GetJwks).
            connect[topology.edge_port(region)] = Address(LOOPBACK, POD.edge)
        connect[topology.tracing_otlp_port] = Address(*settings.trace_collector_address)
        return cls(listen, connect)

    def _place(self, table: Mapping[int, Address], socket: Config, where: str) -> Address:
        port = socket["socket_address"]["port_value"]
        try:
            address = table[port]
        except KeyError:
            raise AddressingError(
                f"{where}: port {port} of the local plan has no Kubernetes address "
                "(add it to mesh/k8s_envoy.py Addressing.for_topology)"
            ) from None
        socket["socket_address"] = {"address": address.host, "port_value": address.port}
        return address

    def apply(self, config: Config) -> Config:
        """A re-addressed deep copy of ``config``."""
        config = copy.deepcopy(config)
        if "admin" in config:
            self._place(self.listen, config["admin"]["address"], "admin")
        resources = config.get("static_resources", {})
        for listener in resources.get("listeners", []):
            self._place(self.listen, listener["address"], f"listener {listener['name']}")
        for cluster in resources.get("clusters", []):
            self._readdress_cluster(cluster)
        return config

    def _readdress_cluster(self, cluster: Config) -> None:
        where = f"cluster {cluster['name']}"
        merged: dict[tuple[int, str], Config] = {}
        by_name = False
        for locality in cluster["load_assignment"]["endpoints"]:
            priority = locality.get("priority", 0)
            region = locality.get("locality", {}).get("region", "")
            target = merged.setdefault(
                (priority, region),
                {
                    **({"locality": {"region": region}} if region else {}),
                    **({"priority": priority} if "priority" in locality else {}),
                    "lb_endpoints": [],
                },
            )
            for lb in locality["lb_endpoints"]:
                endpoint = lb["endpoint"]
                address = self._place(self.connect, endpoint["address"], where)
                by_name = by_name or address.is_name
                check = endpoint.get("health_check_config")
                if check is not None:
                    socket = {"socket_address": {"port_value": check["port_value"]}}
                    probe = self._place(self.connect, socket, f"{where} health check")
                    if probe.host != address.host:
                        raise AddressingError(f"{where}: health check port is on another host")
                    check["port_value"] = probe.port
                # Many local instances of one region are one Service name here.
                if lb not in target["lb_endpoints"]:
                    target["lb_endpoints"].append(lb)
        cluster["load_assignment"]["endpoints"] = list(merged.values())
        if by_name:
            cluster["type"] = "STRICT_DNS"
            # Re-resolved every 5 s (Envoy's default), so new pods join and deleted
            # ones leave within seconds; health checks and outlier detection cover the
            # time in between.
            cluster["dns_lookup_family"] = "V4_PREFERRED"


def _first_instance(topology: Topology, region: str, service: str) -> Instance:
    return next(i for i in topology.instances() if i.region == region and i.service == service)


def _health_listener() -> Config:
    """Plaintext probes for the kubelet, which cannot speak the mesh's mTLS.

    Only ``grpc.health.v1.Health/Check`` reaches the service (the container's gRPC
    probes), and ``/healthz`` answers for Envoy itself; every other path is 404, so the
    API stays reachable only through the mTLS inbound listener. Istio's sidecars
    rewrite probes to their agent's port for the same reason.
    """
    envoy_health = {
        "name": "envoy.filters.http.health_check",
        "typed_config": {
            "@type": envoy.EXT + "filters.http.health_check.v3.HealthCheck",
            "pass_through_mode": False,
            "headers": [{"name": ":path", "string_match": {"exact": "/healthz"}}],
        },
    }
    routes = {
        "name": "health",
        "virtual_hosts": [
            {
                "name": "health",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"path": "/grpc.health.v1.Health/Check"},
                        "route": {"cluster": "local_service", "timeout": "2s"},
                    },
                    {
                        "match": {"prefix": "/"},
                        "direct_response": {
                            "status": 404,
                            "body": {"inline_string": "only gRPC health checks here\n"},
                        },
                    },
                ],
            }
        ],
    }
    return {
        "name": "health",
        "address": {"socket_address": {"address": ANY, "port_value": POD.health}},
        "filter_chains": [{"filters": [envoy._hcm("health", routes, [envoy_health])]}],
    }


def _database_health_over_tls(cluster: Config, database_ca: str) -> None:
    """Health-check the nodes' HTTPS port while SQL stays a plain TCP relay.

    A secure CockroachDB serves ``/health?ready=1`` only over TLS; the SQL connections
    through the relay carry the client's own end-to-end TLS, so only the health
    checks get a TLS transport socket (selected by ``transport_socket_match_criteria``;
    endpoints carry no metadata, so data connections match the raw one).
    """
    cluster["transport_socket_matches"] = [
        {
            "name": "health-tls",
            "match": {"health": "tls"},
            "transport_socket": {
                "name": envoy.TLS_SOCKET,
                "typed_config": {
                    "@type": envoy.EXT + "transport_sockets.tls.v3.UpstreamTlsContext",
                    "common_tls_context": {
                        "validation_context": {"trusted_ca": {"filename": database_ca}}
                    },
                },
            },
        },
        {
            "name": "sql-relay",
            "match": {},
            "transport_socket": {
                "name": "envoy.transport_sockets.raw_buffer",
                "typed_config": {"@type": envoy.EXT + "transport_sockets.raw_buffer.v3.RawBuffer"},
            },
        },
    ]
    for check in cluster["health_checks"]:
        check["transport_socket_match_criteria"] = {"health": "tls"}


def sidecar(
    topology: Topology,
    settings: KubernetesSettings,
    region: str,
    service: str,
    paths: envoy.Paths,
    database_ca: str,
) -> Config:
    """The sidecar config shared by every pod of ``service`` in ``region``."""
    instance = _first_instance(topology, region, service)
    config = Addressing.for_topology(topology, settings).apply(
        envoy.sidecar(topology, instance, paths)
    )
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"].startswith("database_"):
            _database_health_over_tls(cluster, database_ca)
    # One config for all the Deployment's pods: the pod's name comes from the command
    # line (--service-node) and the served-by header from the pod's hostname.
    config["node"] = {"id": f"{region}-{service}", "cluster": f"{region}/{service}"}
    for listener in config["static_resources"]["listeners"]:
        if listener["name"] != "inbound":
            continue
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        for host in hcm["route_config"]["virtual_hosts"]:
            for header in host.get("response_headers_to_add", []):
                if header["header"]["key"] == "x-meshbank-served-by":
                    header["header"]["value"] = f"{region}/{service}/%HOSTNAME%"
    config["static_resources"]["listeners"].append(_health_listener())
    return config


def edge(
    topology: Topology, settings: KubernetesSettings, region: str, paths: envoy.Paths
) -> Config:
    """The edge config shared by every edge pod of ``region``."""
    return Addressing.for_topology(topology, settings).apply(envoy.edge(topology, region, paths))
