"""Prometheus for the local deployment: its config, generated from the topology.

One scrape target per process: every Envoy (sidecars, edges, the global entry) on its
admin ``/stats/prometheus``, every service instance on its ``/metrics`` port, every
Patroni member (``/metrics``) and etcd member (``/metrics``), the ledger auditor, and
Prometheus itself. Each target carries the labels an SRE slices by: ``region``,
``zone`` (where the process has one: services and their sidecars), ``service``,
``instance`` (the process name in ``meshbank status``) and ``role``; the job is the
role. The alert rules (``regions/observability/alerts.yml``) are copied next to the
config so the state folder holds everything Prometheus reads.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from regions import topology as topo

OBSERVABILITY = Path(__file__).resolve().parent / "observability"
RULES = OBSERVABILITY / "alerts.yml"
RULE_TESTS = (OBSERVABILITY / "alerts_test.yml", OBSERVABILITY / "alerts_slo_test.yml")
# Local deployments are short-lived: keep two days, and never more than 1 GB.
RETENTION_TIME = "2d"
RETENTION_SIZE = "1GB"
# Fine enough for a drill to show in a graph; the alert rules' `for:` durations are
# multiples of it. The timeout is the whole interval: on a loaded 2-core machine a
# Patroni /metrics (which queries PostgreSQL) was seen taking 6 s.
SCRAPE_INTERVAL = "10s"
SCRAPE_TIMEOUT = "10s"
# Envoy's admin exports every stat it has (thousands per sidecar, most never touched);
# `usedonly` keeps those that were written, a fraction of the bytes and of Envoy's CPU.
ENVOY_PARAMS = {"usedonly": [""]}


def binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise FileNotFoundError("prometheus is not installed: run tools/bootstrap.sh")
    return found


@dataclass(frozen=True)
class Target:
    job: str
    address: str
    path: str
    labels: dict[str, str]


def targets(topology: topo.Topology, engine: str = "postgres") -> Iterator[Target]:
    """Every process of the deployment that exposes metrics, with its labels (a region's
    processes on the region's address: its namespace's in netns mode)."""
    host = topology.host

    def labels(
        region: str, service: str, instance: str, role: str, zone: str = ""
    ) -> dict[str, str]:
        found = {"region": region, "service": service, "instance": instance, "role": role}
        if zone:
            found["zone"] = zone
        return found

    for i in topology.instances():
        yield Target(
            "service",
            f"{topology.host_of(i.region)}:{i.metrics_port}",
            "/metrics",
            labels(i.region, i.service, i.name, "service", i.zone),
        )
        yield Target(
            "sidecar",
            f"{topology.host_of(i.region)}:{i.admin_port}",
            "/stats/prometheus",
            labels(i.region, i.service, f"{i.name}-sidecar", "sidecar", i.zone),
        )
    for region in topology.region_names:
        yield Target(
            "edge",
            f"{topology.host_of(region)}:{topology.edge_admin_port(region)}",
            "/stats/prometheus",
            labels(region, "edge", f"{region}-edge", "edge"),
        )
        if engine == "cockroachdb":
            # A CockroachDB node serves its metrics on the HTTP port (Patroni's slot).
            yield Target(
                "db",
                f"{topology.host_of(region)}:{topology.patroni_port(region)}",
                "/_status/vars",
                labels(region, "cockroach", f"{region}-db", "db"),
            )
            continue
        yield Target(
            "db",
            f"{topology.host_of(region)}:{topology.patroni_port(region)}",
            "/metrics",
            labels(region, "patroni", f"{region}-db", "db"),
        )
        yield Target(
            "etcd",
            f"{topology.host_of(region)}:{topology.etcd_client_port(region)}",
            "/metrics",
            labels(region, "etcd", f"{region}-etcd", "etcd"),
        )
    yield Target(
        "global",
        f"{host}:{topology.ports['global_admin']}",
        "/stats/prometheus",
        labels("global", "global", "global", "global"),
    )
    yield Target(
        "auditor",
        f"{host}:{topology.auditor_port()}",
        "/metrics",
        labels("global", "auditor", "auditor", "auditor"),
    )
    yield Target(
        "prometheus",
        f"{host}:{topology.prometheus_port()}",
        "/metrics",
        labels("global", "prometheus", "prometheus", "prometheus"),
    )


def config(topology: topo.Topology, engine: str = "postgres") -> dict[str, Any]:
    """The prometheus.yml document: one job per role, one static target per process."""
    jobs: dict[str, dict[str, Any]] = {}
    for t in targets(topology, engine):
        job = jobs.setdefault(
            t.job, {"job_name": t.job, "metrics_path": t.path, "static_configs": []}
        )
        if t.path == "/stats/prometheus":
            job["params"] = ENVOY_PARAMS
        if job["metrics_path"] != t.path:
            raise ValueError(f"job {t.job} mixes metrics paths {job['metrics_path']} and {t.path}")
        job["static_configs"].append({"targets": [t.address], "labels": t.labels})
    return {
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": SCRAPE_TIMEOUT,
            "evaluation_interval": SCRAPE_INTERVAL,
            "external_labels": {"deployment": "meshbank-local"},
        },
        "rule_files": [RULES.name],
        "scrape_configs": list(jobs.values()),
    }


def write(topology: topo.Topology, out: Path, engine: str = "postgres") -> Path:
    """Write prometheus.yml and the alert rules into ``out``; returns the config's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    shutil.copyfile(RULES, out / RULES.name)
    path = out / "prometheus.yml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        "# Generated by regions/prometheus.py from the topology; edits are overwritten.\n"
        + yaml.safe_dump(config(topology, engine), sort_keys=False)
    )
    tmp.replace(path)
    return path


def argv(topology: topo.Topology, out: Path) -> list[str]:
    """The command line of the deployment's Prometheus (config and data under ``out``)."""
    return [
        binary(),
        f"--config.file={out / 'prometheus.yml'}",
        f"--storage.tsdb.path={out / 'data'}",
        f"--storage.tsdb.retention.time={RETENTION_TIME}",
        f"--storage.tsdb.retention.size={RETENTION_SIZE}",
        f"--web.listen-address={topology.host}:{topology.prometheus_port()}",
        # Links in the UI and in alerts point here (not at the machine's hostname).
        f"--web.external-url=http://{topology.host}:{topology.prometheus_port()}/",
        "--log.level=warn",
    ]


def url(topology: topo.Topology) -> str:
    return f"http://{topology.host}:{topology.prometheus_port()}"
