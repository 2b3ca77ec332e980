"""Network namespaces for regions: the building block of the region-partition drill.

Each region gets a namespace ``<prefix>-<index>`` with one veth into a bridge in the
root namespace; region ``i`` owns ``10.213.<i+1>.0/24`` (its host is ``.2``) and the
root namespace is ``10.213.0.1``. A partition is iptables DROP rules inside the
region's namespace for every other region's subnet, which leaves the root namespace
(where the global entry and the operator sit) able to reach it, like clients in that
region would. These addresses exist only inside namespaces this code creates.

Needs root and iproute2 + iptables (tools/bootstrap.sh installs them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

SUBNET = "10.213"


class NetnsError(RuntimeError):
    """Namespaces cannot be created here (not root, no iproute2/iptables, ...)."""


def available() -> bool:
    return (
        os.geteuid() == 0
        and shutil.which("ip") is not None
        and shutil.which("iptables") is not None
    )


def _run(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)
    if result.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: {result.stderr.strip()}")


@dataclass(frozen=True)
class RegionNetwork:
    """Namespaces, veths and a bridge for ``regions``, named after ``prefix`` (≤ 8 chars)."""

    prefix: str
    regions: tuple[str, ...]

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    def namespace(self, region: str) -> str:
        return f"{self.prefix}-{self.regions.index(region)}"

    def host(self, region: str) -> str:
        return f"{SUBNET}.{self.regions.index(region) + 1}.2"

    def subnet(self, region: str) -> str:
        return f"{SUBNET}.{self.regions.index(region) + 1}.0/24"

    @property
    def root_address(self) -> str:
        return f"{SUBNET}.0.1"

    def exec_prefix(self, region: str) -> list[str]:
        """Prepend to a command to run it inside the region's namespace."""
        return ["ip", "netns", "exec", self.namespace(region)]

    def create(self) -> None:
        if not available():
            raise NetnsError("network namespaces need root, iproute2 and iptables")
        self.destroy()
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.root_address}/16", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for index, region in enumerate(self.regions):
            ns, outer, inner = (
                self.namespace(region),
                f"{self.prefix}h{index}",
                f"{self.prefix}n{index}",
            )
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            _run("ip", "link", "set", inner, "netns", ns)
            _run("ip", "link", "set", outer, "master", self.bridge)
            _run("ip", "link", "set", outer, "up")
            _run(
                *self.exec_prefix(region),
                "ip",
                "addr",
                "add",
                f"{self.host(region)}/16",
                "dev",
                inner,
            )
            _run(*self.exec_prefix(region), "ip", "link", "set", inner, "up")
            _run(*self.exec_prefix(region), "ip", "link", "set", "lo", "up")

    def _rules(self, region: str, action: str) -> None:
        for other in self.regions:
            if other == region:
                continue
            _run(
                *self.exec_prefix(region),
                "iptables",
                action,
                "INPUT",
                "-s",
                self.subnet(other),
                "-j",
                "DROP",
            )
            _run(
                *self.exec_prefix(region),
                "iptables",
                action,
                "OUTPUT",
                "-d",
                self.subnet(other),
                "-j",
                "DROP",
            )

    def partition(self, region: str) -> None:
        """Cut ``region`` off from every other region (the root namespace still reaches it)."""
        self._rules(region, "-I")

    def heal(self, region: str) -> None:
        self._rules(region, "-D")

    def destroy(self) -> None:
        """Remove everything ``create`` made; safe to call when nothing exists."""
        for index, region in enumerate(self.regions):
            subprocess.run(
                ["ip", "netns", "del", self.namespace(region)], capture_output=True, check=False
            )
            subprocess.run(
                ["ip", "link", "del", f"{self.prefix}h{index}"], capture_output=True, check=False
            )
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
