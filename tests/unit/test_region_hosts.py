"""Regions on addresses of their own (netns mode): every listener and every address a
region's processes are reached at follows ``Topology.host_of``; the global entry stays on
the root namespace's host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh import envoy
from regions import netns, replication, topology, tracing

PATHS = envoy.Paths(Path("/etc/meshbank/pki"), Path("/etc/meshbank/meshbank.binpb"))
NETWORK = netns.RegionNetwork("mbtest", ("us-east", "us-west", "eu-west"), slot=2)


@pytest.fixture(scope="module")
def spread() -> topology.Topology:
    return topology.with_region_hosts(topology.load(), NETWORK.hosts(), NETWORK.network)


def addresses(config: Any) -> list[tuple[str, int]]:
    """Every socket address anywhere in an Envoy config."""
    found: list[tuple[str, int]] = []
    if isinstance(config, dict):
        if "socket_address" in config:
            found.append(
                (config["socket_address"]["address"], config["socket_address"]["port_value"])
            )
        for value in config.values():
            found += addresses(value)
    elif isinstance(config, list):
        for value in config:
            found += addresses(value)
    return found


def test_host_of_defaults_to_the_shared_host() -> None:
    t = topology.load()
    assert all(t.host_of(r) == "127.0.0.1" for r in t.region_names)
    assert topology.with_port_base(t, 20000).host_of("us-east") == "127.0.0.1"


def test_region_hosts_survive_a_port_shift(spread: topology.Topology) -> None:
    shifted = topology.with_port_base(spread, 20000)
    assert shifted.host_of("eu-west") == "10.213.35.2"
    assert shifted.region_network == "10.213.32.0/20"
    back = topology.with_region_hosts(shifted, {}, None)
    assert back.host_of("eu-west") == "127.0.0.1"
    assert back.region_network is None


def test_unknown_region_is_refused() -> None:
    with pytest.raises(topology.TopologyError, match="unknown regions"):
        topology.with_region_hosts(topology.load(), {"mars": "10.0.0.1"}, None)


def test_sidecars_and_edges_listen_on_their_region_and_reach_each_region_there(
    spread: topology.Topology,
) -> None:
    configs = envoy.render(spread, PATHS)
    port_region = {}
    for i in spread.instances():
        for port in (i.service_port, i.inbound_port, i.db_primary_port, i.db_replica_port):
            port_region[port] = i.region
        port_region[i.admin_port] = i.region
    for r in spread.region_names:
        for port in (
            spread.edge_port(r),
            spread.edge_admin_port(r),
            spread.database_port(r),
            spread.patroni_port(r),
        ):
            port_region[port] = r
    for r in spread.region_names:
        port_region[spread.global_port(r)] = "global"
    port_region[spread.ports["global_admin"]] = "global"
    # The trace collector, reached from inside every namespace at the root namespace's
    # address on the bridge (each namespace's loopback is its own).
    port_region[spread.tracing_otlp_port] = "collector"
    expected_host = {"global": "127.0.0.1", "collector": NETWORK.root_address}
    for name, config in configs.items():
        for host, port in addresses(config):
            region = port_region[port]
            expected = expected_host.get(region) or spread.host_of(region)
            assert host == expected, (name, host, port)


def test_services_export_traces_where_their_namespace_reaches_the_collector(
    spread: topology.Topology,
) -> None:
    assert spread.shared_host == NETWORK.root_address
    assert tracing.collector_endpoint(spread) == f"http://{NETWORK.root_address}:21071"
    assert tracing.collector_endpoint(topology.load()) == "http://127.0.0.1:21071"


def test_members_and_etcd_use_their_region_address(spread: topology.Topology) -> None:
    config = replication.patroni_config(
        spread,
        "us-west",
        Path("/x"),
        {
            "database_password": "p",
            "replication_password": "r",
        },
    )
    assert config["postgresql"]["listen"].startswith("10.213.34.2:")
    assert config["restapi"]["connect_address"].startswith("10.213.34.2:")
    assert [h.split(":")[0] for h in config["etcd3"]["hosts"]] == list(NETWORK.hosts().values())
    # The other members and the root namespace (operator, migrations) connect from the
    # deployment's network.
    assert "host all all 10.213.32.0/20 scram-sha-256" in config["postgresql"]["pg_hba"]
    assert (
        "host replication replicator 10.213.32.0/20 scram-sha-256" in config["postgresql"]["pg_hba"]
    )
    argv = replication.etcd_argv(spread, "eu-west", Path("/x"))
    assert argv[argv.index("--listen-client-urls") + 1].startswith("http://10.213.35.2:")
    cluster = argv[argv.index("--initial-cluster") + 1]
    assert all(f"http://{h}:" in cluster for h in NETWORK.hosts().values())


def test_plain_deployment_allows_only_loopback() -> None:
    config = replication.patroni_config(
        topology.load(),
        "us-west",
        Path("/x"),
        {
            "database_password": "p",
            "replication_password": "r",
        },
    )
    hba = [line for line in config["postgresql"]["pg_hba"] if line.startswith("host")]
    assert hba == [
        "host replication replicator 127.0.0.1/32 scram-sha-256",
        "host all all 127.0.0.1/32 scram-sha-256",
    ]


def test_network_names_and_addresses() -> None:
    assert NETWORK.namespace("eu-west") == "mbtest-2"
    assert NETWORK.exec_prefix("us-west") == ["ip", "netns", "exec", "mbtest-1"]
    assert NETWORK.subnet("us-east") == "10.213.33.0/24"
    assert NETWORK.root_address == "10.213.32.1"
    assert netns.RegionNetwork.from_dict(NETWORK.as_dict()) == NETWORK
    with pytest.raises(netns.NetnsError, match="prefix"):
        netns.RegionNetwork("far-too-long", ("a",))
    with pytest.raises(netns.NetnsError, match="slot"):
        netns.RegionNetwork("mb", ("a",), slot=16)
    with pytest.raises(netns.NetnsError, match="regions"):
        netns.RegionNetwork("mb", tuple(f"r{i}" for i in range(16)))
