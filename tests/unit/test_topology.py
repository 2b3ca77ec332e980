"""Loading and validating the topology file."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from regions import topology
from regions.topology import TopologyError

DEFAULT: dict[str, Any] = yaml.safe_load(topology.DEFAULT_TOPOLOGY.read_text())


def with_change(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(DEFAULT)
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    if value is None:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return data


def test_default_topology_has_three_regions_with_two_replicas_each() -> None:
    t = topology.load()
    assert t.region_names == ("us-east", "us-west", "eu-west")
    assert t.region("us-west").preference == ("us-west", "us-east", "eu-west")
    instances = list(t.instances())
    assert len(instances) == 3 * 3 * 2
    assert {(i.region, i.service) for i in instances if i.replica == 2} == {
        (r, s) for r in t.region_names for s in ("auth", "account", "transfer")
    }
    # Replicas spread across the region's zones.
    assert {i.zone for i in instances if i.region == "us-east"} == {"us-east-1a", "us-east-1b"}
    assert len(t.all_ports()) == 6 * 18 + 3 * 7 + 1 + 4  # + tracing UI, OTLP, Prometheus, auditor


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("regions.us-east.failover", ["us-west", "mars"], "unknown region 'mars'"),
        ("regions.us-east.failover", ["us-west"], "missing ['eu-west']"),
        ("regions.us-east.failover", ["us-east", "us-west", "eu-west"], "itself"),
        ("regions.us-east.zones", [], "zones"),
        ("services.transfer.replicas", 0, "positive integer"),
        ("services.transfer.replicas", "two", "positive integer"),
        ("services.account", None, "services.account: missing"),
        ("services.ledger", {"replicas": 1}, "unknown service"),
        ("ports.edge", 21000, "port 21000 is used by both"),
        ("ports.instances", 65500, "outside 1024-65535"),
        ("ports.global", None, "ports.global"),
        ("default_location", "moon", "unknown region 'moon'"),
    ],
)
def test_bad_topologies_are_refused_with_a_clear_message(
    path: str, value: Any, message: str
) -> None:
    with pytest.raises(TopologyError) as exc:
        topology.parse(with_change(path, value))
    assert message in str(exc.value)


def test_every_problem_is_reported_at_once() -> None:
    data = with_change("services.auth.replicas", 0)
    data["regions"]["us-west"]["failover"] = ["nowhere", "us-east", "eu-west"]
    with pytest.raises(TopologyError) as exc:
        topology.parse(data)
    assert "replicas" in str(exc.value)
    assert "nowhere" in str(exc.value)


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("regions: [unclosed")
    with pytest.raises(TopologyError, match=str(path)):
        topology.load(path)


def test_port_plan_can_be_shifted_as_a_block() -> None:
    t = topology.with_port_base(topology.load(), 20000)
    assert min(t.all_ports()) == 20000
    assert t.global_port("us-east") == 20000


def _with_edge(edge: object) -> dict[str, object]:
    data: dict[str, object] = yaml.safe_load(topology.DEFAULT_TOPOLOGY.read_text())
    data["edge"] = edge
    return data


def test_the_edge_section_sets_quotas_and_limits() -> None:
    t = topology.parse(
        _with_edge(
            {
                "quotas": {"login": {"burst": 3, "refill": 1, "interval_seconds": 30}},
                "limits": {"max_request_bytes": 4096},
            }
        )
    )
    assert t.edge.login == topology.Quota(burst=3, refill=1, interval_seconds=30)
    assert t.edge.partner == topology.EdgePolicy().partner  # absent: the default
    assert t.edge.max_request_bytes == 4096
    assert topology.with_port_base(t, 40000).edge == t.edge


@pytest.mark.parametrize(
    ("edge", "problem"),
    [
        ({"quotas": {"partner": {"burst": 5, "refill": 10}}}, "refill (10) cannot exceed burst"),
        ({"quotas": {"partner": {"burst": 0}}}, "edge.quotas.partner.burst"),
        ({"quotas": {"partner": {"burst": True}}}, "edge.quotas.partner.burst"),
        ({"quotas": {"admin": {}}}, "edge.quotas.admin: unknown quota"),
        ({"limits": {"max_request_bytes": "1MB"}}, "edge.limits.max_request_bytes"),
        ({"limits": {"max_body": 1}}, "edge.limits.max_body: unknown limit"),
        ({"mtls": {}}, "edge: unknown keys ['mtls']"),
        ("fast", "edge: must be a mapping"),
    ],
)
def test_a_bad_edge_section_is_refused_with_its_name(edge: object, problem: str) -> None:
    with pytest.raises(topology.TopologyError, match=re.escape(problem)):
        topology.parse(_with_edge(edge))


def test_the_tracing_section_sets_the_sample_rate() -> None:
    assert topology.parse(DEFAULT).trace_sample_percent == 10.0
    assert topology.parse(with_change("tracing.sample_percent", 0.5)).trace_sample_percent == 0.5
    assert topology.parse(with_change("tracing", None)).trace_sample_percent == (
        topology.DEFAULT_TRACE_SAMPLE_PERCENT
    )
    t = topology.parse(with_change("tracing.sample_percent", 100))
    assert topology.with_port_base(t, 40000).trace_sample_percent == 100.0


@pytest.mark.parametrize(
    ("tracing", "problem"),
    [
        ({"sample_percent": 101}, "tracing.sample_percent: must be a number from 0 to 100"),
        ({"sample_percent": -1}, "tracing.sample_percent"),
        ({"sample_percent": "10%"}, "tracing.sample_percent"),
        ({"sample_percent": True}, "tracing.sample_percent"),
        ({"sample_rate": 0.1}, "tracing: unknown keys ['sample_rate']"),
        ("all", "tracing: must be a mapping"),
    ],
)
def test_a_bad_tracing_section_is_refused_with_its_name(tracing: object, problem: str) -> None:
    with pytest.raises(topology.TopologyError, match=re.escape(problem)):
        topology.parse(with_change("tracing", tracing))
