"""The generated Prometheus config, and the alert rules checked and unit-tested by promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from regions import prometheus, topology

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (tools/bootstrap.sh installs it)"
)


def test_every_process_is_a_target_with_its_labels() -> None:
    t = topology.load()
    targets = list(prometheus.targets(t))
    roles = Counter(x.labels["role"] for x in targets)
    n = len(list(t.instances()))
    regions = len(t.region_names)
    assert roles == {
        "service": n,
        "sidecar": n,
        "edge": regions,
        "db": regions,
        "etcd": regions,
        "global": 1,
        "auditor": 1,
        "prometheus": 1,
    }
    # One target per process: every address is a port of the plan, none twice.
    ports = t.all_ports()
    addresses = [x.address for x in targets]
    assert len(set(addresses)) == len(addresses)
    assert all(int(a.rpartition(":")[2]) in ports for a in addresses)
    # Instance names are those of `meshbank status`, so a page points at a process.
    names = {x.labels["instance"] for x in targets}
    assert {i.name for i in t.instances()} <= names
    assert {f"{i.name}-sidecar" for i in t.instances()} <= names
    for x in targets:
        assert {"region", "service", "instance", "role"} <= set(x.labels)
    sidecar = next(x for x in targets if x.labels["instance"] == "us-west-transfer-2-sidecar")
    assert sidecar.labels == {
        "region": "us-west",
        "zone": "us-west-2b",
        "service": "transfer",
        "instance": "us-west-transfer-2-sidecar",
        "role": "sidecar",
    }
    assert sidecar.path == "/stats/prometheus"  # Envoy's admin endpoint


def test_cockroachdb_nodes_are_scraped_instead_of_patroni_and_etcd() -> None:
    targets = list(prometheus.targets(topology.load(), engine="cockroachdb"))
    db = [x for x in targets if x.labels["role"] == "db"]
    assert len(db) == 3
    assert {x.path for x in db} == {"/_status/vars"}
    assert not [x for x in targets if x.labels["role"] == "etcd"]


def test_ports_follow_the_port_base() -> None:
    t = topology.with_port_base(topology.load(), 30000)
    argv = prometheus.argv(t, Path("/state/prometheus"))
    assert f"--web.listen-address=127.0.0.1:{t.prometheus_port()}" in argv
    assert "--storage.tsdb.path=/state/prometheus/data" in argv
    assert any(a.startswith("--storage.tsdb.retention.time=") for a in argv)
    assert all(30000 <= int(x.address.rpartition(":")[2]) < 30250 for x in prometheus.targets(t))


@needs_promtool
def test_written_config_passes_promtool_check_config(tmp_path: Path) -> None:
    path = prometheus.write(topology.load(), tmp_path)
    config = yaml.safe_load(path.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert (tmp_path / "alerts.yml").read_text() == prometheus.RULES.read_text()
    assert {j["job_name"] for j in config["scrape_configs"]} == {
        "service",
        "sidecar",
        "edge",
        "db",
        "etcd",
        "global",
        "auditor",
        "prometheus",
    }
    result = subprocess.run(
        [str(PROMTOOL), "check", "config", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_pass_promtool_check_rules() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(prometheus.RULES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", *(t.name for t in prometheus.RULE_TESTS)],
        cwd=prometheus.OBSERVABILITY,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _alerts() -> list[str]:
    rules = yaml.safe_load(prometheus.RULES.read_text())
    return [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_is_unit_tested_and_has_a_runbook_entry() -> None:
    cases = [
        case
        for path in prometheus.RULE_TESTS
        for group in yaml.safe_load(path.read_text())["tests"]
        for case in group.get("alert_rule_test", [])
    ]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    headings = {m.lower() for m in re.findall(r"^#+ .*?`?(\w+)`?\s*$", runbook, re.MULTILINE)}
    for alert in _alerts():
        assert alert in fired, f"no promtool test makes {alert} fire"
        assert alert in quiet, f"no promtool test shows {alert} staying quiet"
        assert alert.lower() in headings, f"docs/runbook.md has no section for {alert}"
