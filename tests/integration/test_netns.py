"""Region namespaces and the partition they allow, with real namespaces, veths and iptables."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from regions import netns

pytestmark = pytest.mark.skipif(
    not netns.available(), reason="network namespaces need root, iproute2 and iptables"
)


@pytest.fixture
def network() -> Iterator[netns.RegionNetwork]:
    net = netns.allocate(f"mt{secrets.token_hex(2)}", ("us-east", "us-west", "eu-west"))
    try:
        net.create()
        yield net
    finally:
        net.destroy()


def reachable(net: netns.RegionNetwork, source: str | None, target: str, port: int) -> bool:
    code = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(1.5)\n"
        f"sys.exit(0 if s.connect_ex(({net.host(target)!r}, {port})) == 0 else 1)\n"
    )
    prefix = net.exec_prefix(source) if source else []
    return (
        subprocess.run([*prefix, sys.executable, "-c", code], check=False, timeout=30).returncode
        == 0
    )


def test_partition_cuts_a_region_off_from_the_others_only(network: netns.RegionNetwork) -> None:
    port = 18080
    server = subprocess.Popen(
        [
            *network.exec_prefix("us-east"),
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            network.host("us-east"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not reachable(network, None, "us-east", port):
            assert time.monotonic() < deadline, "the server in us-east never came up"
            time.sleep(0.2)
        assert reachable(network, "us-west", "us-east", port)
        network.partition("us-east")
        assert len(network.rules("us-east")) == 4  # in and out, for each other region
        assert not reachable(network, "us-west", "us-east", port)
        assert not reachable(network, "eu-west", "us-east", port)
        assert reachable(network, None, "us-east", port)  # the root namespace (clients) still can
        network.heal("us-east")
        assert network.rules("us-east") == []
        assert reachable(network, "eu-west", "us-east", port)
    finally:
        server.kill()
        server.wait()


def test_destroy_leaves_nothing(network: netns.RegionNetwork) -> None:
    network.destroy()
    names = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert network.prefix not in names
    links = subprocess.run(["ip", "link"], capture_output=True, text=True, check=True).stdout
    assert network.bridge not in links


def test_a_second_network_takes_another_slot(network: netns.RegionNetwork) -> None:
    other = netns.allocate(f"mt{secrets.token_hex(2)}", network.regions)
    assert other.slot != network.slot
    assert not set(other.hosts().values()) & set(network.hosts().values())
    clash = netns.RegionNetwork(f"mt{secrets.token_hex(2)}", network.regions, network.slot)
    try:
        with pytest.raises(netns.NetnsError, match="already on another bridge"):
            clash.create()
    finally:
        clash.destroy()
