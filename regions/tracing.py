"""The local deployment's tracing UI and trace collector: Arize Phoenix.

Jaeger, Zipkin and Tempo cannot be installed on these machines (DESIGN.md); Phoenix
accepts OTLP/gRPC and shows whole span trees. It runs from its own venv (built by
tools/bootstrap.sh from ``regions/phoenix-requirements.txt``: it pins its own
OpenTelemetry, SQLAlchemy and gRPC), keeps its data (SQLite) under the state folder, and
listens on the two ports of the topology's port plan: ``tracing_ui`` (web UI, REST API)
and ``tracing_otlp`` (OTLP/gRPC, where every Envoy and service exports).

In production the same ``tracing_otlp`` address is an OpenTelemetry Collector in front
of Jaeger or Tempo; the services only see ``OTEL_EXPORTER_OTLP_ENDPOINT``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from regions.topology import Topology


def phoenix_venv() -> Path:
    return Path(os.environ.get("MESHBANK_PHOENIX_VENV", "/opt/meshbank/phoenix-venv"))


def phoenix_argv() -> list[str]:
    """The command that serves the UI; refuses with the fix when it is not installed."""
    binary = phoenix_venv() / "bin" / "phoenix"
    if not binary.exists():
        raise FileNotFoundError(
            f"the tracing UI is not installed ({binary} is missing): run tools/bootstrap.sh"
        )
    return [str(binary), "serve"]


def phoenix_env(topology: Topology, data_dir: Path, base: Mapping[str, str]) -> dict[str, str]:
    """Phoenix's environment: loopback ports from the plan, data in ``data_dir``, and
    nothing that reaches outside (no CDN assets, no usage telemetry)."""
    env = {k: v for k, v in base.items() if not k.startswith(("MESHBANK_", "OTEL_"))}
    env.update(
        PHOENIX_HOST=topology.host,
        PHOENIX_PORT=str(topology.tracing_ui_port),
        PHOENIX_GRPC_PORT=str(topology.tracing_otlp_port),
        PHOENIX_WORKING_DIR=str(data_dir),
        PHOENIX_ALLOW_EXTERNAL_RESOURCES="false",
        PHOENIX_TELEMETRY_ENABLED="false",
        # Its own SQL and migrations at INFO would fill its log with every statement.
        PHOENIX_DB_LOGGING_LEVEL="warning",
        PHOENIX_LOG_MIGRATIONS="false",
    )
    return env


def ui_url(topology: Topology) -> str:
    return f"http://{topology.host}:{topology.tracing_ui_port}"


def trace_url(topology: Topology, trace_id: str) -> str:
    """The UI page of one trace (Phoenix redirects to it from the OTel trace id)."""
    return f"{ui_url(topology)}/redirects/traces/{trace_id}"


def collector_endpoint(topology: Topology) -> str:
    """Where services export (Phoenix's OTLP/gRPC listens on every address)."""
    return f"http://{topology.shared_host}:{topology.tracing_otlp_port}"


def health_url(topology: Topology) -> str:
    """The URL that answers 200 once the UI and its collector are up."""
    return f"{ui_url(topology)}/healthz"


def sampler_env(topology: Topology) -> dict[str, str]:
    """The SDK's sampler for the topology's ``tracing.sample_percent``: a call that comes
    with a ``traceparent`` (through a sidecar) keeps its sampled flag, and a call that
    reaches a service directly is traced at the topology's rate, as at the proxies."""
    return {
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": repr(topology.trace_sample_percent / 100),
    }


def service_env(topology: Topology) -> dict[str, str]:
    """The standard OTEL_* variables every service gets: export to the collector, send
    spans every 250 ms (the SDK's default 5 s makes a fresh trace look missing), and the
    topology's sampling."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector_endpoint(topology),
        "OTEL_BSP_SCHEDULE_DELAY": "250",
        **sampler_env(topology),
    }
