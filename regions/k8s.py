"""Kubernetes manifests for the topology: one cluster per region (``meshbank render k8s``).

Per region, in namespace ``<prefix>-<region>`` (Pod Security "restricted"):

* each service as a Deployment (>= 3 replicas, spread over the region's zones, a
  PodDisruptionBudget, an HPA) whose pods run the service on loopback and its Envoy
  sidecar (a native sidecar: an init container with ``restartPolicy: Always``, so it
  starts before the service and stops after it) with the generated config in a
  ConfigMap; a headless Service the edges resolve to every ready pod;
* the edge as a Deployment behind a ``LoadBalancer`` Service;
* CockroachDB as a StatefulSet started with ``--locality=region=<region>`` and
  ``--join`` over every region's nodes; in the first region, a Job that initialises
  the cluster and applies the Alembic migrations (multi-region DDL included);
* NetworkPolicies: nothing gets in unless listed; service pods take connections only
  on the sidecar's mTLS port and only from edge pods (this cluster's, or the other
  regions' pod networks, whose edges fail over here).

Secrets are only referenced (``secretKeyRef`` and Secret volumes); the Secret names
each region needs are listed by :func:`required_secrets`. Images come pinned from the
topology. The Envoy configs are those of ``mesh.envoy``, re-addressed by
``mesh.k8s_envoy``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from mesh import api, envoy, k8s_envoy
from mesh.k8s_envoy import POD
from mesh.public_tls import PublicCert
from regions import tracing
from regions.k8s_settings import KubernetesSettings, image_problem
from regions.topology import Region, Topology

Manifest = dict[str, Any]

TLS_DIR = Path("/etc/meshbank/tls")
# The edges' partner-facing certificate: a Secret of type kubernetes.io/tls (tls.crt,
# tls.key, and ca.crt: what the edge's JWKS fetch through its own listener verifies),
# e.g. filled by a cert-manager Certificate. Never written into the manifests.
PUBLIC_TLS_DIR = Path("/etc/meshbank/public-tls")
PUBLIC_TLS_SECRET = "meshbank-edge-public-tls"  # noqa: S105 - a Secret name
DB_CERTS_DIR = "/etc/meshbank/db"
ENVOY_DIR = "/etc/meshbank/envoy"
API_DIR = "/etc/meshbank/api"
TOPOLOGY_DIR = "/etc/meshbank/topology"
COCKROACH_CERTS = "/cockroach/cockroach-certs"
DESCRIPTOR_NAME = "meshbank.binpb"
OPENAPI_NAME = "openapi.yaml"


ZONE_KEY = "topology.kubernetes.io/zone"
HOST_KEY = "kubernetes.io/hostname"
# The services image's user (Dockerfile), distroless Envoy's "nonroot", CockroachDB's.
SERVICE_UID = 10001
ENVOY_UID = 65532
COCKROACH_UID = 1000
DATABASE_USER = "meshbank"


class RenderError(ValueError):
    """The topology cannot be rendered for Kubernetes (the message says why)."""


@dataclass(frozen=True)
class Resources:
    cpu_request: str
    memory_request: str
    cpu_limit: str
    memory_limit: str

    def spec(self) -> Manifest:
        return {
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request},
            "limits": {"cpu": self.cpu_limit, "memory": self.memory_limit},
        }


SERVICE_RESOURCES = Resources("250m", "256Mi", "1", "512Mi")
SIDECAR_RESOURCES = Resources("100m", "64Mi", "500m", "256Mi")
EDGE_RESOURCES = Resources("500m", "128Mi", "2", "512Mi")
# Guaranteed QoS: a database node must not be the first thing evicted under pressure.
COCKROACH_RESOURCES = Resources("2", "8Gi", "2", "8Gi")
JOB_RESOURCES = Resources("100m", "128Mi", "500m", "512Mi")


@dataclass(frozen=True)
class Rendered:
    """Manifests of every region: ``files[region][file name]`` is a list of objects."""

    files: dict[str, dict[str, list[Manifest]]]


def _settings(topology: Topology) -> KubernetesSettings:
    if topology.kubernetes is None:
        raise RenderError(
            "the topology has no `kubernetes` section (see regions/topology.yaml and "
            "docs/deploy-kubernetes.md)"
        )
    return topology.kubernetes


def primary_region(topology: Topology) -> str:
    """Where the one-off Jobs run: the database's PRIMARY REGION (migration 0002)."""
    return topology.region_names[0]


def envoy_paths() -> envoy.Paths:
    public = PublicCert(
        PUBLIC_TLS_DIR / "tls.crt", PUBLIC_TLS_DIR / "tls.key", PUBLIC_TLS_DIR / "ca.crt"
    )
    return envoy.Paths(TLS_DIR, Path(API_DIR) / DESCRIPTOR_NAME, "cockroachdb", public=public)


def database_url(host: str, port: int) -> str:
    """A client-certificate URL (no password to hide) for the ``meshbank`` user."""
    certs = DB_CERTS_DIR
    return (
        f"cockroachdb+psycopg://{DATABASE_USER}@{host}:{port}/meshbank?sslmode=verify-full"
        f"&sslrootcert={certs}/ca.crt&sslcert={certs}/client.{DATABASE_USER}.crt"
        f"&sslkey={certs}/client.{DATABASE_USER}.key"
    )


def _labels(region: str, component: str, name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "meshbank",
        "meshbank.io/region": region,
    }


def _selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name}


def _meta(name: str, namespace: str, labels: Mapping[str, str], **extra: Any) -> Manifest:
    return {"name": name, "namespace": namespace, "labels": dict(labels), **extra}


def _container_security(uid: int) -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security(fs_group: int) -> Manifest:
    # fsGroup makes the mounted Secrets (mode 0440, owned by root) readable by the
    # containers' users and nobody else, which both libpq and CockroachDB accept.
    return {
        "runAsNonRoot": True,
        "fsGroup": fs_group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _spread(name: str, *, hosts_hard: bool = False, per_revision: bool = True) -> list[Manifest]:
    """Even over zones (never two ahead in one zone), and over nodes within a zone."""

    def one(key: str, hard: bool) -> Manifest:
        constraint: Manifest = {
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "DoNotSchedule" if hard else "ScheduleAnyway",
            "labelSelector": {"matchLabels": _selector(name)},
        }
        if per_revision:
            # Each Deployment revision spreads on its own, so a rollout's new pods
            # are not skewed by the old ones that are about to go.
            constraint["matchLabelKeys"] = ["pod-template-hash"]
        return constraint

    return [one(ZONE_KEY, True), one(HOST_KEY, hosts_hard)]


def _zone_affinity(region: Region) -> Manifest:
    """Pods run only in the zones the topology names for their region."""
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": ZONE_KEY, "operator": "In", "values": list(region.zones)}
                        ]
                    }
                ]
            }
        }
    }


def _secret_volume(name: str, secret: str, items: Mapping[str, str]) -> Manifest:
    return {
        "name": name,
        "secret": {
            "secretName": secret,
            "defaultMode": 0o440,
            "items": [{"key": k, "path": p} for k, p in items.items()],
        },
    }


def _config_volume(name: str, config_map: str) -> Manifest:
    return {"name": name, "configMap": {"name": config_map}}


def _tmp_volume() -> Manifest:
    return {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}


def _mount(name: str, path: str) -> Manifest:
    return {"name": name, "mountPath": path, "readOnly": True}


def _tls_items(stem: str) -> dict[str, str]:
    """cert-manager's Secret keys, renamed to the files ``mesh.envoy`` expects."""
    return {"tls.crt": f"{stem}.crt", "tls.key": f"{stem}.key", "ca.crt": "ca.crt"}


def _checksum(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _envoy_container(
    name: str,
    image: str,
    resources: Resources,
    mounts: list[Manifest],
    probe_port: int,
    ports: list[Manifest],
    concurrency: int,
    probe_scheme: str = "HTTP",
) -> Manifest:
    probe: Manifest = {"httpGet": {"path": "/healthz", "port": probe_port}}
    if probe_scheme != "HTTP":
        # The kubelet does not verify an HTTPS probe's certificate (it only needs TLS).
        probe["httpGet"]["scheme"] = probe_scheme
    return {
        "name": name,
        "image": image,
        "args": [
            "-c",
            f"{ENVOY_DIR}/envoy.yaml",
            "--service-node",
            "$(POD_NAME)",
            # Envoy would start a worker per CPU of the node, not of its CPU limit.
            "--concurrency",
            str(concurrency),
            "--log-level",
            "warn",
            "--drain-time-s",
            "5",
        ],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": ports,
        "resources": resources.spec(),
        "securityContext": _container_security(ENVOY_UID),
        "readinessProbe": {**probe, "periodSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
        # Endpoints are removed from DNS and the load balancer before Envoy drains.
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
        "volumeMounts": [_mount("envoy-config", ENVOY_DIR), *mounts, _tmp_mount()],
    }


def _tmp_mount() -> Manifest:
    return {"name": "tmp", "mountPath": "/tmp"}  # noqa: S108 - a pod's own emptyDir


def _config_map(name: str, namespace: str, labels: Mapping[str, str], data: Manifest) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(name, namespace, labels),
        **data,
    }


def _pdb(name: str, namespace: str, labels: Mapping[str, str]) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, namespace, labels),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": _selector(name)},
            # A pod that never became ready may be evicted even when the budget is spent.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def _service_account(name: str, namespace: str, labels: Mapping[str, str]) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(name, namespace, labels),
        # Nothing here talks to the Kubernetes API.
        "automountServiceAccountToken": False,
    }


def _deployment(
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    replicas: int,
    pod_spec: Manifest,
    checksum: str,
) -> Manifest:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, namespace, labels),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": _selector(name)},
            # Never below the desired count during a rollout.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": dict(labels),
                    # A changed Envoy config or topology rolls the pods.
                    "annotations": {"meshbank.io/config-checksum": checksum},
                },
                "spec": pod_spec,
            },
        },
    }


class _RegionRenderer:
    def __init__(self, topology: Topology, region: str, topology_text: str) -> None:
        self.topology = topology
        self.settings = _settings(topology)
        self.region = topology.region(region)
        self.ns = self.settings.namespace(region)
        self.topology_text = topology_text
        self.topology_checksum = _checksum(topology_text)

    @property
    def images(self) -> Mapping[str, str]:
        return self.settings.images

    def labels(self, component: str, name: str) -> dict[str, str]:
        return _labels(self.region.name, component, name)

    # -- shared objects -----------------------------------------------------------

    def namespace(self, descriptor: bytes, openapi: str) -> list[Manifest]:
        restricted = {
            f"pod-security.kubernetes.io/{mode}": "restricted"
            for mode in ("enforce", "audit", "warn")
        }
        common = self.labels("config", "meshbank")
        accounts = [
            _service_account(name, self.ns, self.labels(component, name))
            for name, component in [
                *((s, "service") for s in self.topology.services),
                ("edge", "edge"),
                ("cockroachdb", "database"),
                ("meshbank-migrate", "migration"),
            ]
        ]
        return [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": self.ns,
                    "labels": {**restricted, "meshbank.io/region": self.region.name},
                },
            },
            *accounts,
            _config_map(
                "meshbank-topology",
                self.ns,
                common,
                {"data": {"topology.yaml": self.topology_text}},
            ),
            _config_map(
                "meshbank-api-descriptor",
                self.ns,
                common,
                {
                    "binaryData": {DESCRIPTOR_NAME: base64.b64encode(descriptor).decode()},
                    # The edges serve it (GET /v1/openapi.yaml) from beside the descriptors.
                    "data": {OPENAPI_NAME: openapi},
                },
            ),
        ]

    # -- services -----------------------------------------------------------------

    def service(self, service: str) -> list[Manifest]:
        name = service
        labels = self.labels("service", name)
        config_name = f"{service}-sidecar"
        config = envoy.dump(
            k8s_envoy.sidecar(
                self.topology,
                self.settings,
                self.region.name,
                service,
                envoy_paths(),
                f"{DB_CERTS_DIR}/ca.crt",
            )
        )
        grpc_name = api.full_service_name(service)
        env: list[Manifest] = [
            {"name": "MESHBANK_DATABASE_URL", "value": database_url("127.0.0.1", POD.db_primary)},
            {
                "name": "MESHBANK_DATABASE_READ_URL",
                "value": database_url("127.0.0.1", POD.db_replica),
            },
            {"name": "MESHBANK_LISTEN_ADDRESS", "value": f"127.0.0.1:{POD.service}"},
            {"name": "MESHBANK_REGION", "value": self.region.name},
            {"name": "MESHBANK_TOPOLOGY", "value": f"{TOPOLOGY_DIR}/topology.yaml"},
            {
                "name": "MESHBANK_INSTANCE_ID",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
            },
            {"name": "MESHBANK_SHUTDOWN_GRACE_SECONDS", "value": "10"},
            # The services export their spans to the cluster's collector, as the
            # sidecars do, sampled like them (the topology's tracing.sample_percent).
            {
                "name": "OTEL_EXPORTER_OTLP_ENDPOINT",
                "value": f"http://{self.settings.trace_collector}",
            },
            *({"name": k, "value": v} for k, v in tracing.sampler_env(self.topology).items()),
        ]
        if service == "auth":
            env.append(
                {
                    "name": "MESHBANK_KEY_PASSPHRASE",
                    "valueFrom": {
                        "secretKeyRef": {"name": "meshbank-auth", "key": "key-passphrase"}
                    },
                }
            )
        stem = f"{self.region.name}-{service}"
        client_cert_items = {
            "ca.crt": "ca.crt",
            f"client.{DATABASE_USER}.crt": f"client.{DATABASE_USER}.crt",
            f"client.{DATABASE_USER}.key": f"client.{DATABASE_USER}.key",
        }
        # The kubelet reaches the service's gRPC health only through the sidecar's
        # plaintext probe listener: the service itself listens on loopback.
        probe = {"grpc": {"port": POD.health, "service": grpc_name}}
        service_container: Manifest = {
            "name": service,
            "image": self.images["services"],
            "command": ["meshbank", "serve", service],
            "env": env,
            "resources": SERVICE_RESOURCES.spec(),
            "securityContext": _container_security(SERVICE_UID),
            "startupProbe": {**probe, "periodSeconds": 2, "failureThreshold": 60},
            "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 2},
            "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
            "volumeMounts": [
                _mount("database-client", DB_CERTS_DIR),
                _mount("topology", TOPOLOGY_DIR),
                _tmp_mount(),
            ],
        }
        sidecar = _envoy_container(
            "envoy",
            self.images["envoy"],
            SIDECAR_RESOURCES,
            [_mount("mesh-tls", str(TLS_DIR)), _mount("database-ca", DB_CERTS_DIR)],
            POD.health,
            [
                {"name": "mesh-mtls", "containerPort": POD.inbound},
                {"name": "probes", "containerPort": POD.health},
            ],
            concurrency=1,
        )
        # A native sidecar: up before the service (which needs it for the database)
        # and stopped after it, so draining calls can still commit.
        sidecar["restartPolicy"] = "Always"
        pod_spec: Manifest = {
            "serviceAccountName": name,
            "automountServiceAccountToken": False,
            "securityContext": _pod_security(SERVICE_UID),
            "terminationGracePeriodSeconds": 30,
            "affinity": _zone_affinity(self.region),
            "topologySpreadConstraints": _spread(name),
            "initContainers": [sidecar],
            "containers": [service_container],
            "volumes": [
                _config_volume("envoy-config", config_name),
                _config_volume("topology", "meshbank-topology"),
                _secret_volume("mesh-tls", f"meshbank-tls-{service}", _tls_items(stem)),
                _secret_volume("database-client", "meshbank-db-client", client_cert_items),
                _secret_volume("database-ca", "meshbank-db-client", {"ca.crt": "ca.crt"}),
                _tmp_volume(),
            ],
        }
        replicas = self.settings.replicas[service]
        return [
            _config_map(config_name, self.ns, labels, {"data": {"envoy.yaml": config}}),
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta(name, self.ns, labels),
                "spec": {
                    # Headless: the edges resolve every ready pod and health-check,
                    # balance and eject each one themselves.
                    "clusterIP": "None",
                    "selector": _selector(name),
                    "ports": [
                        {
                            "name": "mesh-mtls",
                            "port": POD.inbound,
                            "targetPort": "mesh-mtls",
                            "protocol": "TCP",
                        }
                    ],
                },
            },
            _deployment(
                name,
                self.ns,
                labels,
                replicas,
                pod_spec,
                _checksum(config, self.topology_checksum, self.images["services"]),
            ),
            _pdb(name, self.ns, labels),
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": _meta(name, self.ns, labels),
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "minReplicas": replicas,
                    "maxReplicas": self.settings.max_replicas[service],
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {
                                "name": "cpu",
                                "target": {"type": "Utilization", "averageUtilization": 70},
                            },
                        }
                    ],
                    # A region that takes over another's traffic scales up at once and
                    # gives the capacity back slowly.
                    "behavior": {
                        "scaleUp": {"stabilizationWindowSeconds": 0},
                        "scaleDown": {"stabilizationWindowSeconds": 300},
                    },
                },
            },
        ]

    # -- edge ---------------------------------------------------------------------

    def edge(self) -> list[Manifest]:
        name = "edge"
        labels = self.labels("edge", name)
        config_name = "edge-envoy"
        config = envoy.dump(
            k8s_envoy.edge(self.topology, self.settings, self.region.name, envoy_paths())
        )
        container = _envoy_container(
            "envoy",
            self.images["envoy"],
            EDGE_RESOURCES,
            [
                _mount("mesh-tls", str(TLS_DIR)),
                _mount("public-tls", str(PUBLIC_TLS_DIR)),
                _mount("api-descriptor", API_DIR),
            ],
            POD.edge,
            [{"name": "api", "containerPort": POD.edge}],
            concurrency=2,
            probe_scheme="HTTPS",  # the edge's only listener serves TLS only
        )
        pod_spec: Manifest = {
            "serviceAccountName": name,
            "automountServiceAccountToken": False,
            "securityContext": _pod_security(ENVOY_UID),
            "terminationGracePeriodSeconds": 30,
            "affinity": _zone_affinity(self.region),
            "topologySpreadConstraints": _spread(name),
            "containers": [container],
            "volumes": [
                _config_volume("envoy-config", config_name),
                _config_volume("api-descriptor", "meshbank-api-descriptor"),
                _secret_volume(
                    "mesh-tls", "meshbank-tls-edge", _tls_items(f"{self.region.name}-edge")
                ),
                _secret_volume(
                    "public-tls",
                    PUBLIC_TLS_SECRET,
                    {"tls.crt": "tls.crt", "tls.key": "tls.key", "ca.crt": "ca.crt"},
                ),
                _tmp_volume(),
            ],
        }
        return [
            _config_map(config_name, self.ns, labels, {"data": {"envoy.yaml": config}}),
            _deployment(
                name,
                self.ns,
                labels,
                self.settings.edge_replicas,
                pod_spec,
                _checksum(config, self.topology_checksum),
            ),
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta(name, self.ns, labels),
                "spec": {
                    "type": "LoadBalancer",
                    # Straight to an edge pod on the node, keeping the client address.
                    "externalTrafficPolicy": "Local",
                    "selector": _selector(name),
                    "ports": [
                        {"name": "api", "port": POD.edge, "targetPort": "api", "protocol": "TCP"}
                    ],
                },
            },
            _pdb(name, self.ns, labels),
        ]

    # -- database -----------------------------------------------------------------

    def _join(self) -> str:
        hosts = []
        for region in self.topology.region_names:
            ns = self.settings.namespace(region)
            for n in range(self.settings.cockroach_nodes):
                hosts.append(
                    f"cockroachdb-{n}.cockroachdb.{ns}.svc.{self.settings.cluster_domain}"
                    f":{POD.cockroach_sql}"
                )
        return ",".join(hosts)

    def cockroachdb(self) -> list[Manifest]:
        name = "cockroachdb"
        labels = self.labels("database", name)
        ports = [
            {"name": "sql", "port": POD.cockroach_sql, "targetPort": "sql", "protocol": "TCP"},
            {"name": "http", "port": POD.cockroach_http, "targetPort": "http", "protocol": "TCP"},
        ]
        advertise = f"$(POD_NAME).cockroachdb.{self.ns}.svc.{self.settings.cluster_domain}"
        container: Manifest = {
            "name": "cockroachdb",
            "image": self.images["cockroachdb"],
            "command": ["/cockroach/cockroach"],
            "args": [
                "start",
                f"--certs-dir={COCKROACH_CERTS}",
                "--store=/cockroach/cockroach-data",
                f"--listen-addr=:{POD.cockroach_sql}",
                f"--http-addr=:{POD.cockroach_http}",
                f"--advertise-addr={advertise}:{POD.cockroach_sql}",
                f"--join={self._join()}",
                # The region tier is what PRIMARY REGION / ADD REGION and REGIONAL BY
                # ROW place data by (regions/cockroach.py uses the same names).
                f"--locality=region={self.region.name}",
                "--cache=.25",
                "--max-sql-memory=.25",
            ],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
            "ports": [
                {"name": "sql", "containerPort": POD.cockroach_sql},
                {"name": "http", "containerPort": POD.cockroach_http},
            ],
            "resources": COCKROACH_RESOURCES.spec(),
            "securityContext": _container_security(COCKROACH_UID),
            "readinessProbe": {
                "httpGet": {"path": "/health?ready=1", "port": "http", "scheme": "HTTPS"},
                "periodSeconds": 5,
                "failureThreshold": 2,
            },
            "livenessProbe": {
                "httpGet": {"path": "/health", "port": "http", "scheme": "HTTPS"},
                "initialDelaySeconds": 30,
                "periodSeconds": 10,
            },
            "volumeMounts": [
                {"name": "datadir", "mountPath": "/cockroach/cockroach-data"},
                _mount("certs", COCKROACH_CERTS),
                _tmp_mount(),
            ],
        }
        pod_spec: Manifest = {
            "serviceAccountName": name,
            "automountServiceAccountToken": False,
            "securityContext": _pod_security(COCKROACH_UID),
            # A node drains its leases before it stops.
            "terminationGracePeriodSeconds": 300,
            "affinity": _zone_affinity(self.region),
            # One node per machine, even over zones.
            "topologySpreadConstraints": _spread(name, hosts_hard=True, per_revision=False),
            "containers": [container],
            "volumes": [
                _secret_volume(
                    "certs",
                    "cockroachdb-node",
                    {"ca.crt": "ca.crt", "node.crt": "node.crt", "node.key": "node.key"},
                ),
                _tmp_volume(),
            ],
        }
        return [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta(name, self.ns, labels),
                "spec": {
                    # Per-pod DNS names for --join and for the sidecars' health-checked
                    # database clusters, including pods not ready yet (a node must be
                    # found to join before it can become ready).
                    "clusterIP": "None",
                    "publishNotReadyAddresses": True,
                    "selector": _selector(name),
                    "ports": ports,
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta("cockroachdb-public", self.ns, labels),
                "spec": {"selector": _selector(name), "ports": ports},
            },
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": _meta(name, self.ns, labels),
                "spec": {
                    "serviceName": name,
                    "replicas": self.settings.cockroach_nodes,
                    "podManagementPolicy": "Parallel",
                    "updateStrategy": {"type": "RollingUpdate"},
                    "selector": {"matchLabels": _selector(name)},
                    "template": {"metadata": {"labels": labels}, "spec": pod_spec},
                    "volumeClaimTemplates": [
                        {
                            "metadata": {"name": "datadir", "labels": labels},
                            "spec": {
                                "accessModes": ["ReadWriteOnce"],
                                "resources": {
                                    "requests": {"storage": self.settings.cockroach_storage}
                                },
                            },
                        }
                    ],
                },
            },
            _pdb(name, self.ns, labels),
        ]

    def migrations(self) -> list[Manifest]:
        """Initialise the cluster once, create the database and its owner, migrate."""
        labels = self.labels("migration", "meshbank-migrate")
        first = f"cockroachdb-0.cockroachdb.{self.ns}.svc.{self.settings.cluster_domain}"
        public = f"cockroachdb-public.{self.ns}.svc.{self.settings.cluster_domain}"
        cockroach = "/cockroach/cockroach"
        certs = f"--certs-dir={COCKROACH_CERTS}"
        sql = (
            f"CREATE DATABASE IF NOT EXISTS meshbank; CREATE USER IF NOT EXISTS {DATABASE_USER}; "
            f"ALTER DATABASE meshbank OWNER TO {DATABASE_USER};"
        )
        # `cockroach init` succeeds once; later runs say "already been initialized".
        script = (
            f"until {cockroach} init {certs} --host={first}:{POD.cockroach_sql} 2>/tmp/init.err"
            " || grep -q 'already been initialized' /tmp/init.err;"
            " do cat /tmp/init.err; sleep 5; done\n"
            f'{cockroach} sql {certs} --host={public}:{POD.cockroach_sql} -e "{sql}"\n'
        )
        setup: Manifest = {
            "name": "create-database",
            "image": self.images["cockroachdb"],
            "command": ["/bin/bash", "-ec", script],
            "resources": JOB_RESOURCES.spec(),
            "securityContext": _container_security(COCKROACH_UID),
            "volumeMounts": [_mount("root-client", COCKROACH_CERTS), _tmp_mount()],
        }
        migrate: Manifest = {
            "name": "migrate",
            "image": self.images["services"],
            "command": ["meshbank", "migrate"],
            "env": [
                {"name": "MESHBANK_DATABASE_URL", "value": database_url(public, POD.cockroach_sql)},
                {"name": "MESHBANK_TOPOLOGY", "value": f"{TOPOLOGY_DIR}/topology.yaml"},
            ],
            "resources": JOB_RESOURCES.spec(),
            "securityContext": _container_security(SERVICE_UID),
            "volumeMounts": [
                _mount("database-client", DB_CERTS_DIR),
                _mount("topology", TOPOLOGY_DIR),
                _tmp_mount(),
            ],
        }
        # Jobs are immutable: a new image or topology is a new Job.
        version = _checksum(self.images["services"], self.topology_checksum)[:10]
        return [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": _meta(f"meshbank-migrate-{version}", self.ns, labels),
                "spec": {
                    # Waits for every region's nodes (ADD REGION needs them) by retrying.
                    "backoffLimit": 20,
                    "activeDeadlineSeconds": 3600,
                    "ttlSecondsAfterFinished": 7 * 86400,
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "serviceAccountName": "meshbank-migrate",
                            "automountServiceAccountToken": False,
                            "restartPolicy": "Never",
                            "securityContext": _pod_security(SERVICE_UID),
                            "initContainers": [setup],
                            "containers": [migrate],
                            "volumes": [
                                _secret_volume(
                                    "root-client",
                                    "cockroachdb-client-root",
                                    {
                                        "ca.crt": "ca.crt",
                                        "client.root.crt": "client.root.crt",
                                        "client.root.key": "client.root.key",
                                    },
                                ),
                                _secret_volume(
                                    "database-client",
                                    "meshbank-db-client",
                                    {
                                        "ca.crt": "ca.crt",
                                        f"client.{DATABASE_USER}.crt": (
                                            f"client.{DATABASE_USER}.crt"
                                        ),
                                        f"client.{DATABASE_USER}.key": (
                                            f"client.{DATABASE_USER}.key"
                                        ),
                                    },
                                ),
                                _config_volume("topology", "meshbank-topology"),
                                _tmp_volume(),
                            ],
                        },
                    },
                },
            }
        ]

    # -- network policies -----------------------------------------------------------

    def network_policies(self) -> list[Manifest]:
        labels = self.labels("network-policy", "meshbank")
        remote = [
            {"ipBlock": {"cidr": self.settings.pod_cidrs[r]}}
            for r in self.topology.region_names
            if r != self.region.name
        ]

        def component(*names: str) -> Manifest:
            return {
                "podSelector": {
                    "matchExpressions": [
                        {
                            "key": "app.kubernetes.io/component",
                            "operator": "In",
                            "values": list(names),
                        }
                    ]
                }
            }

        def policy(name: str, selected: Manifest, ingress: list[Manifest]) -> Manifest:
            return {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": _meta(name, self.ns, labels),
                "spec": {"podSelector": selected, "policyTypes": ["Ingress"], "ingress": ingress},
            }

        def tcp(*ports: int) -> list[Manifest]:
            return [{"protocol": "TCP", "port": p} for p in ports]

        return [
            # Everything not admitted below is dropped (the kubelet's probes from the
            # pod's own node are always allowed by NetworkPolicy semantics).
            policy("default-deny-ingress", {}, []),
            policy(
                "services-only-from-edges",
                component("service")["podSelector"],
                # Only the sidecar's mTLS port; the service itself is on loopback.
                [{"from": [component("edge"), *remote], "ports": tcp(POD.inbound)}],
            ),
            policy(
                "edge-from-anywhere",
                component("edge")["podSelector"],
                [{"ports": tcp(POD.edge)}],
            ),
            policy(
                "cockroachdb-from-mesh",
                component("database")["podSelector"],
                [
                    {
                        # This region's sidecars, migrations and nodes, and the other
                        # regions' nodes and sidecars (database failover).
                        "from": [component("service", "migration", "database"), *remote],
                        "ports": tcp(POD.cockroach_sql, POD.cockroach_http),
                    }
                ],
            ),
        ]

    def files(self, descriptor: bytes, openapi: str) -> dict[str, list[Manifest]]:
        files = {
            "00-namespace.yaml": self.namespace(descriptor, openapi),
            "10-cockroachdb.yaml": self.cockroachdb(),
        }
        if self.region.name == primary_region(self.topology):
            files["15-migrations.yaml"] = self.migrations()
        for service in self.topology.services:
            files[f"20-{service}.yaml"] = self.service(service)
        files["30-edge.yaml"] = self.edge()
        files["40-network-policies.yaml"] = self.network_policies()
        return files


def render(
    topology: Topology,
    topology_text: str,
    descriptor: bytes,
    openapi: str,
    services_image: str | None = None,
) -> Rendered:
    """Every region's manifests; ``services_image`` overrides the topology's (CI builds).

    ``descriptor`` and ``openapi`` (the generated API descriptor set and OpenAPI
    document) go into each region's ConfigMap, where the edges read them."""
    settings = _settings(topology)
    if services_image is not None:
        problem = image_problem(services_image)
        if problem:
            raise RenderError(f"--image: {problem}")
        settings = replace(settings, images={**settings.images, "services": services_image})
        topology = replace(topology, kubernetes=settings)
    files = {
        region: _RegionRenderer(topology, region, topology_text).files(descriptor, openapi)
        for region in topology.region_names
    }
    return Rendered(files)


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """libyaml's safe dumper (several times faster), with embedded files as blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # An embedded Envoy config or topology stays readable (and diffable) as a block.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_all(manifests: Iterable[Manifest]) -> str:
    return yaml.dump_all(
        list(manifests), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100
    )


def write(rendered: Rendered, out_dir: Path) -> list[Path]:
    """Write ``<out>/<region>/<file>.yaml`` (``kubectl apply -f <out>/<region>/``)."""
    written = []
    for region, files in rendered.files.items():
        region_dir = out_dir / region
        region_dir.mkdir(parents=True, exist_ok=True)
        for stale in region_dir.glob("*.yaml"):
            if stale.name not in files:
                stale.unlink()
        for name, manifests in files.items():
            path = region_dir / name
            path.write_text(dump_all(manifests))
            written.append(path)
    return written


def required_secrets(topology: Topology) -> dict[str, list[str]]:
    """The Secrets each region's namespace must hold before the manifests are applied."""
    settings = _settings(topology)
    needs: dict[str, list[str]] = {}
    for region in topology.region_names:
        names = [f"meshbank-tls-{s}" for s in topology.services]
        names += [
            "meshbank-tls-edge",
            PUBLIC_TLS_SECRET,
            "meshbank-db-client",
            "meshbank-auth",
            "cockroachdb-node",
        ]
        if region == primary_region(topology):
            names.append("cockroachdb-client-root")
        needs[settings.namespace(region)] = sorted(names)
    return needs
