"""The ``kubernetes`` section of the topology file, validated with the rest of it.

It says how the same regions, zones and services become one Kubernetes cluster per
region (``meshbank render k8s``): replicas (at least 3, so a zone and a rolling update
can be lost at once), the pinned images, the namespace naming that lets the clusters
find each other by DNS, and the pod networks other regions connect from.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MIN_REPLICAS = 3
IMAGE_KEYS = ("services", "envoy", "cockroachdb")
_VERSION = re.compile(r"^1\.(\d+)\.(\d+)$")
# name[:tag][@sha256:digest]; a tag is pinned only if it holds an exact x.y.z version.
_IMAGE = re.compile(
    r"^(?P<name>[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
_EXACT_VERSION = re.compile(r"(?:^|[^0-9.])v?[0-9]+\.[0-9]+\.[0-9]+(?:$|[^0-9.])")
_DNS_LABEL = re.compile(r"^[a-z]([a-z0-9-]{0,40}[a-z0-9])?$")
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^[0-9]+(Mi|Gi|Ti)$")


DEFAULT_TRACE_COLLECTOR = "otel-collector.observability.svc.cluster.local:4317"
_HOST_PORT = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?:[0-9]{1,5}$")


@dataclass(frozen=True)
class KubernetesSettings:
    # The Kubernetes release the manifests target (and are validated against).
    version: str
    # Each region's objects live in namespace "<prefix>-<region>" of that region's
    # cluster; the same name in every cluster is what cross-cluster DNS forwards.
    namespace_prefix: str
    cluster_domain: str
    replicas: Mapping[str, int]
    max_replicas: Mapping[str, int]
    edge_replicas: int
    cockroach_nodes: int
    cockroach_storage: str
    images: Mapping[str, str]
    # The pod network of each region's cluster: remote edges and database nodes
    # connect from there, so the NetworkPolicies admit exactly these ranges.
    pod_cidrs: Mapping[str, str]
    # Where every Envoy and service exports traces (OTLP/gRPC, host:port): the cluster's
    # OpenTelemetry collector, which forwards to the production Jaeger or Tempo.
    trace_collector: str = DEFAULT_TRACE_COLLECTOR

    @property
    def trace_collector_address(self) -> tuple[str, int]:
        host, _, port = self.trace_collector.rpartition(":")
        return host, int(port)

    def namespace(self, region: str) -> str:
        return f"{self.namespace_prefix}-{region}"

    def service_dns(self, name: str, region: str) -> str:
        """The cluster-wide DNS name of Service ``name`` in ``region``'s namespace."""
        return f"{name}.{self.namespace(region)}.svc.{self.cluster_domain}"


def image_problem(reference: str) -> str | None:
    """Why ``reference`` is not a pinned image (a digest or an exact version tag)."""
    match = _IMAGE.match(reference)
    if match is None:
        return f"{reference!r} is not an image reference"
    tag, digest = match["tag"], match["digest"]
    if digest:
        return None
    if tag is None:
        return f"{reference!r} has neither a tag nor a digest (it would mean :latest)"
    if not _EXACT_VERSION.search(tag):
        return f"{reference!r}: tag {tag!r} is not an exact version (x.y.z) and there is no digest"
    return None


def _count(raw: Any, where: str, lo: int, hi: int, problems: list[str]) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or not lo <= raw <= hi:
        problems.append(f"{where}: must be an integer from {lo} to {hi}, got {raw!r}")
        return lo
    return raw


def parse(
    raw: Any, regions: Sequence[str], services: Sequence[str], problems: list[str]
) -> KubernetesSettings | None:
    """Validate the section (absent: None); every problem is appended to ``problems``."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append("kubernetes: must be a mapping")
        return None
    known = {
        "version",
        "namespace_prefix",
        "cluster_domain",
        "replicas",
        "max_replicas",
        "edge_replicas",
        "cockroach_nodes",
        "cockroach_storage",
        "images",
        "pod_cidrs",
        "trace_collector",
    }
    for key in sorted(set(raw) - known):
        problems.append(f"kubernetes.{key}: unknown key (known: {', '.join(sorted(known))})")
    version = str(raw.get("version", ""))
    release = _VERSION.match(version)
    if release is None:
        problems.append(f"kubernetes.version: a Kubernetes release like 1.34.0, got {version!r}")
    elif int(release[1]) < 30:
        # Native sidecars, preStop sleep and gRPC probes are on by default from 1.30.
        problems.append("kubernetes.version: at least 1.30.0 (native sidecars, preStop sleep)")
    prefix = raw.get("namespace_prefix", "meshbank")
    if not isinstance(prefix, str) or not _DNS_LABEL.match(prefix):
        problems.append(f"kubernetes.namespace_prefix: a DNS label, got {prefix!r}")
    domain = raw.get("cluster_domain", "cluster.local")
    if not isinstance(domain, str) or not _DOMAIN.match(domain):
        problems.append(f"kubernetes.cluster_domain: a DNS domain, got {domain!r}")

    replicas: dict[str, int] = {}
    max_replicas: dict[str, int] = {}
    raw_replicas = raw.get("replicas") or {}
    raw_max = raw.get("max_replicas") or {}
    if not isinstance(raw_replicas, dict) or not isinstance(raw_max, dict):
        problems.append("kubernetes.replicas and max_replicas: mappings of service to a count")
        raw_replicas, raw_max = {}, {}
    for key in sorted((set(raw_replicas) | set(raw_max)) - set(services)):
        problems.append(f"kubernetes.replicas/max_replicas: unknown service {key!r}")
    for service in services:
        where = f"kubernetes.replicas.{service}"
        replicas[service] = _count(raw_replicas.get(service, MIN_REPLICAS), where, 3, 100, problems)
        max_replicas[service] = _count(
            raw_max.get(service, 3 * replicas[service]),
            f"kubernetes.max_replicas.{service}",
            replicas[service],
            300,
            problems,
        )
    edge_replicas = _count(
        raw.get("edge_replicas", 3), "kubernetes.edge_replicas", 3, 100, problems
    )
    nodes = _count(raw.get("cockroach_nodes", 3), "kubernetes.cockroach_nodes", 3, 15, problems)
    storage = raw.get("cockroach_storage", "100Gi")
    if not isinstance(storage, str) or not _QUANTITY.match(storage):
        problems.append(f"kubernetes.cockroach_storage: a size like 100Gi, got {storage!r}")

    images: dict[str, str] = {}
    raw_images = raw.get("images") or {}
    if not isinstance(raw_images, dict):
        raw_images = {}
    for key in IMAGE_KEYS:
        ref = raw_images.get(key)
        if not isinstance(ref, str):
            problems.append(f"kubernetes.images.{key}: a pinned image reference is required")
            continue
        problem = image_problem(ref)
        if problem:
            problems.append(f"kubernetes.images.{key}: {problem}")
        images[key] = ref
    for key in sorted(set(raw_images) - set(IMAGE_KEYS)):
        problems.append(f"kubernetes.images.{key}: unknown image (known: {', '.join(IMAGE_KEYS)})")

    cidrs: dict[str, str] = {}
    raw_cidrs = raw.get("pod_cidrs") or {}
    if not isinstance(raw_cidrs, dict):
        raw_cidrs = {}
    networks: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
    for region in regions:
        value = raw_cidrs.get(region)
        try:
            network = ipaddress.ip_network(str(value))
        except ValueError:
            problems.append(
                f"kubernetes.pod_cidrs.{region}: a CIDR like 10.10.0.0/16, got {value!r}"
            )
            continue
        for other, seen in networks:
            if network.overlaps(seen):
                problems.append(
                    f"kubernetes.pod_cidrs: {region} {network} overlaps {other} {seen} "
                    "(peered pod networks must not overlap)"
                )
        networks.append((region, network))
        cidrs[region] = str(network)
    for key in sorted(set(raw_cidrs) - set(regions)):
        problems.append(f"kubernetes.pod_cidrs.{key}: unknown region")

    collector = raw.get("trace_collector", DEFAULT_TRACE_COLLECTOR)
    if not isinstance(collector, str) or not _HOST_PORT.match(collector):
        problems.append(f"kubernetes.trace_collector: host:port, got {collector!r}")
        collector = DEFAULT_TRACE_COLLECTOR

    return KubernetesSettings(
        version=version,
        namespace_prefix=str(prefix),
        cluster_domain=str(domain),
        replicas=replicas,
        max_replicas=max_replicas,
        edge_replicas=edge_replicas,
        cockroach_nodes=nodes,
        cockroach_storage=str(storage),
        images=images,
        pod_cidrs=cidrs,
        trace_collector=collector,
    )
