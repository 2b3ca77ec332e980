"""Network namespaces for regions: the building block of the region-partition drill.

Each region gets a namespace ``<prefix>-<index>`` with one veth into a bridge in the
root namespace. A network takes one of 16 slots of ``10.213.0.0/16``: slot ``s`` is
``10.213.<16s>.0/20``, the root namespace's bridge address is ``10.213.<16s>.1`` and
region ``i`` owns ``10.213.<16s+i+1>.0/24`` (its host is ``.2``), so parallel
deployments (each with its own prefix and slot) never share an address. A partition is
iptables DROP rules inside the region's namespace for every other region's subnet,
which leaves the root namespace (where the global entry and the operator sit) able to
reach it, like clients in that region would. These addresses exist only inside
namespaces this code creates; deleting a namespace deletes its rules with it.

Needs root and iproute2 + iptables (tools/bootstrap.sh installs them).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass

SUBNET = "10.213"
NETWORK = f"{SUBNET}.0.0/16"
SLOTS = 16
MAX_REGIONS = 15  # a slot is a /20: 16 /24s, the first for the bridge


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
    slot: int = 0

    def __post_init__(self) -> None:
        # Interface names are at most 15 bytes: prefix + "br" / "h<i>" / "n<i>".
        if not (1 <= len(self.prefix) <= 8 and self.prefix.isalnum()):
            raise NetnsError(f"prefix {self.prefix!r}: 1-8 letters or digits")
        if not 1 <= len(self.regions) <= MAX_REGIONS:
            raise NetnsError(f"1 to {MAX_REGIONS} regions per network, got {len(self.regions)}")
        if not 0 <= self.slot < SLOTS:
            raise NetnsError(f"slot {self.slot} is outside 0-{SLOTS - 1}")

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    def namespace(self, region: str) -> str:
        return f"{self.prefix}-{self.regions.index(region)}"

    def _third(self, region: str) -> int:
        return SLOTS * self.slot + self.regions.index(region) + 1

    def host(self, region: str) -> str:
        return f"{SUBNET}.{self._third(region)}.2"

    def subnet(self, region: str) -> str:
        return f"{SUBNET}.{self._third(region)}.0/24"

    @property
    def root_address(self) -> str:
        return f"{SUBNET}.{SLOTS * self.slot}.1"

    @property
    def network(self) -> str:
        """The slot's /20: every region host and the root namespace's bridge address."""
        return f"{SUBNET}.{SLOTS * self.slot}.0/20"

    def hosts(self) -> dict[str, str]:
        return {region: self.host(region) for region in self.regions}

    def as_dict(self) -> dict[str, object]:
        return {"prefix": self.prefix, "regions": list(self.regions), "slot": self.slot}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> RegionNetwork:
        regions = data["regions"]
        slot = data["slot"]
        if not isinstance(regions, list) or not isinstance(slot, int):
            raise NetnsError(f"not a region network: {data!r}")
        return cls(str(data["prefix"]), tuple(str(r) for r in regions), slot)

    def exec_prefix(self, region: str) -> list[str]:
        """Prepend to a command to run it inside the region's namespace."""
        return ["ip", "netns", "exec", self.namespace(region)]

    def create(self) -> None:
        if not available():
            raise NetnsError("network namespaces need root, iproute2 and iptables")
        self.destroy()
        if self.slot in used_slots():
            raise NetnsError(
                f"{self.network} is already on another bridge (another deployment's network)"
            )
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.root_address}/20", "dev", self.bridge)
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
                f"{self.host(region)}/20",
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

    def exists(self) -> bool:
        """Whether any namespace of this network is still there."""
        names = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=False
        ).stdout.split()
        return any(self.namespace(r) in names for r in self.regions)

    def partition(self, region: str) -> None:
        """Cut ``region`` off from every other region (the root namespace still reaches it)."""
        self._rules(region, "-I")

    def heal(self, region: str) -> None:
        """Lift the partition: the namespace's chains hold only ``partition``'s rules, so
        flushing them also heals a partition that was only half put in place."""
        for chain in ("INPUT", "OUTPUT"):
            _run(*self.exec_prefix(region), "iptables", "-F", chain)

    def rules(self, region: str) -> list[str]:
        """The region namespace's filter rules (``iptables -S``), for checks."""
        result = subprocess.run(
            [*self.exec_prefix(region), "iptables", "-S"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        return [line for line in result.stdout.splitlines() if line.startswith("-A")]

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


def used_slots() -> set[int]:
    """Slots whose bridge address is configured in the root namespace right now."""
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=False
    ).stdout
    slots = set()
    network = ipaddress.ip_network(NETWORK)
    for word in out.split():
        try:
            interface = ipaddress.ip_interface(word)
        except ValueError:
            continue
        if interface.ip in network:
            slots.add(int(str(interface.ip).split(".")[2]) // SLOTS)
    return slots


def allocate(prefix: str, regions: tuple[str, ...]) -> RegionNetwork:
    """A network named ``prefix`` in a slot no other bridge uses (first probe from a hash
    of the prefix, so concurrent starts rarely race for the same slot)."""
    used = used_slots()
    first = int(hashlib.sha256(prefix.encode()).hexdigest(), 16) % SLOTS
    for n in range(SLOTS):
        slot = (first + n) % SLOTS
        if slot not in used:
            return RegionNetwork(prefix, regions, slot)
    raise NetnsError(f"all {SLOTS} slots of {NETWORK} are in use by other networks")
