"""The bank check's nemesis: a registry of fault kinds and a schedule that injects them.

A fault kind is a name, a default hold time, a way to inject it (returning something
that heals it) and a way to say why it cannot run here. Kinds that the failover
drills already implement (regions/drills.py ``Fault``) are used through it, so a
drill and the nemesis break things the same way; a new drill plugs in by name with
``register(drill_kind(...))``. Kinds:

* ``service-kill``     SIGKILL one random service instance; the supervisor restarts it.
* ``service-pause``    SIGSTOP one random service instance for the hold, then SIGCONT
                       (requests in flight on it hang, the client times out and
                       retries elsewhere; the paused one may commit late).
* ``db-leader-kill``   the drill: SIGKILL the leader's Patroni + PostgreSQL, held down.
* ``leader-pause``     the drill: SIGSTOP the leader's Patroni + PostgreSQL past the
                       leader key's ttl, then SIGCONT.
* ``region-kill``      the drill: SIGKILL every process of the leader's region, held down.
* ``region-partition`` the drill of that name, where this build has it and the
                       deployment runs in network namespaces; otherwise reported as
                       skipped with the reason (never faked).

The schedule runs the enabled kinds round-robin: quiet gap, inject, hold, heal, wait
until the processes hit are healthy and the database has a leader and a synchronous
standby again, next. Every enabled kind runs at least once, then rounds go on while
the duration lasts. ``heal_all()`` lifts whatever is still injected; the caller runs
it in ``finally`` so an error or Ctrl-C never leaves a region down or a process stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from regions import drills, local, netns, replication
from regions.topology import Topology

PARTITION = "region-partition"


class NemesisError(RuntimeError):
    """A fault cannot be injected (unknown kind, nothing to target, ...)."""


class FaultUnavailable(NemesisError):
    """This kind cannot run on this deployment; reported as skipped with the reason."""


class Injection(Protocol):
    """An injected fault: what it hit, and how to lift it."""

    target: str

    def heal(self) -> None: ...


@dataclass(frozen=True)
class FaultContext:
    state: Path
    topology: Topology
    rng: random.Random


@dataclass(frozen=True)
class FaultKind:
    name: str
    summary: str
    hold: float  # default seconds between injecting and healing
    inject: Callable[[FaultContext], Injection]
    unavailable: Callable[[FaultContext], str | None] = lambda _ctx: None


FAULT_KINDS: dict[str, FaultKind] = {}


def register(kind: FaultKind) -> FaultKind:
    FAULT_KINDS[kind.name] = kind
    return kind


def leader_region(ctx: FaultContext, timeout: float = 60.0) -> str:
    """The leader's region. Asked again for a while: on a busy machine a member's
    Patroni can miss its 1 s answer even while the cluster is fine."""
    deadline = time.monotonic() + timeout
    while (region := replication.leader(ctx.topology)) is None:
        if time.monotonic() > deadline:
            raise NemesisError(f"the database has had no leader for {timeout:.0f} s")
        time.sleep(0.5)
    return region


@dataclass
class DrillInjection:
    """A drill's fault on the leader's region, healed with the drill's own stop()."""

    fault: drills.Fault
    target: str

    def heal(self) -> None:
        self.fault.stop()


def drill_kind(name: str, summary: str, hold: float) -> FaultKind:
    def inject(ctx: FaultContext) -> Injection:
        region = leader_region(ctx)
        fault = drills.Fault(name, ctx.state, region)
        fault.start()
        return DrillInjection(fault, region)

    def unavailable(_ctx: FaultContext) -> str | None:
        if name not in drills.DRILLS:
            return f"this build has no {name!r} drill (regions/drills.py)"
        return None

    return FaultKind(name, summary, hold, inject, unavailable)


def service_instances(state: Path) -> list[tuple[str, int]]:
    """(name, pid) of every running service instance, from the supervisor's status."""
    status = local.read_status(state) or {"processes": []}
    return [
        (str(p["name"]), int(p["pid"]))
        for p in status["processes"]
        if p["role"] == "service" and p.get("pid")
    ]


def _pick_instance(ctx: FaultContext) -> tuple[str, int]:
    instances = service_instances(ctx.state)
    if not instances:
        raise NemesisError("no running service instance to hit")
    return ctx.rng.choice(instances)


@dataclass
class Killed:
    """A SIGKILLed service instance: healing is the supervisor's restart, not ours."""

    target: str

    def heal(self) -> None:
        pass


def _kill_service(ctx: FaultContext) -> Injection:
    name, pid = _pick_instance(ctx)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return Killed(name)


@dataclass
class Paused:
    """SIGSTOPped processes, continued on heal."""

    target: str
    pids: list[int]

    def heal(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _pause_service(ctx: FaultContext) -> Injection:
    name, pid = _pick_instance(ctx)
    pids = drills.process_tree(pid)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
    return Paused(name, pids)


def _partition(ctx: FaultContext) -> Injection:
    region = leader_region(ctx)
    try:
        fault = drills.Fault(PARTITION, ctx.state, region)
        fault.start()
    except drills.DrillError as exc:  # e.g. this deployment does not run in namespaces
        raise FaultUnavailable(str(exc)) from exc
    return DrillInjection(fault, region)


def _partition_unavailable(ctx: FaultContext) -> str | None:
    if PARTITION not in drills.DRILLS:
        return f"this build has no {PARTITION!r} drill (regions/drills.py)"
    if not netns.available():
        return "needs root, ip and iptables: regions run in network namespaces only then"
    if local.read_network(ctx.state) is None:
        return (
            "this deployment's regions do not run in network namespaces: start it with "
            "`MESHBANK_NETNS=1 meshbank up --detach` (root) to partition one"
        )
    return None


register(FaultKind("service-kill", "SIGKILL one service instance", 0.0, _kill_service))
register(FaultKind("service-pause", "SIGSTOP one service instance", 4.0, _pause_service))
register(drill_kind("db-leader-kill", "SIGKILL the leader's Patroni + PostgreSQL", 5.0))
# Longer than the leader key's ttl (6 s): a new leader is elected while the old one sleeps.
register(drill_kind("leader-pause", "SIGSTOP the leader's Patroni + PostgreSQL", 9.0))
register(drill_kind("region-kill", "SIGKILL every process of the leader's region", 5.0))
register(
    dataclasses.replace(
        drill_kind(PARTITION, "cut the leader's region off from the other regions", 8.0),
        inject=_partition,
        unavailable=_partition_unavailable,
    )
)


def parse_kinds(spec: str) -> list[str]:
    """``all`` or a comma-separated list of registered kinds (or ``none``)."""
    if spec.strip() in ("", "none"):
        return []
    if spec.strip() == "all":
        return list(FAULT_KINDS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in FAULT_KINDS]
    if unknown:
        raise NemesisError(
            f"unknown fault kind(s) {', '.join(unknown)}; known: {', '.join(FAULT_KINDS)}"
        )
    return list(dict.fromkeys(names))


@dataclass
class FaultRecord:
    kind: str
    target: str
    injected_at: float  # seconds since the run started
    healed_at: float | None = None
    recovered_at: float | None = None  # every process healthy, leader + sync standby
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("injected_at", "healed_at", "recovered_at"):
            if data[key] is not None:
                data[key] = round(data[key], 3)
        return data


def fresh_status(state: Path, deadline: float, writes: int = 2) -> None:
    """Wait until the supervisor rewrote its status ``writes`` times: the second write
    comes from a health pass that started after now, so it has seen what we did (a
    killed instance is not "healthy" just because the last pass predates the kill)."""
    path = state / "status.json"

    def mtime() -> int:
        try:
            return path.stat().st_mtime_ns
        except OSError:
            return 0

    last, seen = mtime(), 0
    while seen < writes and time.monotonic() < deadline:
        time.sleep(0.1)
        now = mtime()
        if now != last:
            last, seen = now, seen + 1


def recovered(state: Path, topology: Topology, target: str | None = None) -> bool:
    """The processes hit (``target``: a region or an instance name; all if None) are
    healthy again and the database has a leader and a synchronous standby: ready for
    the next fault. Only the target: on a machine shared with other work some
    unrelated health check always flaps for a moment, and "all healthy in one pass"
    then kept the schedule waiting for no reason."""
    status = local.read_status(state) or {"processes": []}
    hit = [p for p in status["processes"] if target in (None, p["region"], p["name"])]
    if not hit or not all(p["healthy"] for p in hit):
        return False
    cluster = replication.cluster_state(topology) or {}
    roles = [m.get("role") for m in cluster.get("members", [])]
    return "leader" in roles and "sync_standby" in roles


@dataclass
class Nemesis:
    ctx: FaultContext
    kinds: list[str]
    hold: float | None = None  # overrides every kind's default hold
    gap: float = 3.0
    recovery_timeout: float = 120.0
    t0: float = field(default_factory=time.monotonic)
    log: Callable[[str], None] = lambda _m: None
    records: list[FaultRecord] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    _active: list[tuple[FaultRecord, Injection]] = field(default_factory=list, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)

    def __post_init__(self) -> None:
        for name in self.kinds:
            reason = FAULT_KINDS[name].unavailable(self.ctx)
            if reason is not None:
                self.skipped[name] = reason

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _hold(self, kind: FaultKind) -> float:
        return kind.hold if self.hold is None else self.hold

    def run(self, until: float) -> None:
        """Inject every runnable kind once, then go on round-robin until ``until``
        (seconds since t0), starting a fault only if its hold and a gap fit before then.

        The first round always completes, however long recoveries take: a run that
        skipped a kind because the machine was slow would pass without testing it.
        """
        runnable = [FAULT_KINDS[n] for n in self.kinds if n not in self.skipped]
        if not runnable or self._stop.wait(self.gap):
            return
        for n, kind in enumerate(itertools.cycle(runnable)):
            if self._stop.is_set() or all(k.name in self.skipped for k in runnable):
                return
            if kind.name in self.skipped:  # found unavailable when first injected
                continue
            first_round = n < len(runnable)
            if not first_round and self._now() + self._hold(kind) + self.gap > until:
                return
            self._one(kind)
            if self._stop.wait(self.gap):
                return

    def stop(self) -> None:
        self._stop.set()

    def _one(self, kind: FaultKind) -> None:
        record = FaultRecord(kind.name, "", self._now())
        self.records.append(record)
        try:
            injection = kind.inject(self.ctx)
        except FaultUnavailable as exc:
            self.records.pop()
            self.skipped[kind.name] = str(exc)
            self.log(f"{kind.name}: skipped: {exc}")
            return
        except (NemesisError, drills.DrillError, OSError) as exc:
            record.error = str(exc)
            self.log(f"{kind.name}: could not inject: {exc}")
            return
        record.target = injection.target
        self._active.append((record, injection))
        self.log(f"{record.injected_at:7.1f}s inject {kind.name} on {injection.target}")
        self._stop.wait(self._hold(kind))
        self.heal_all()
        self.log(f"{self._now():7.1f}s healed {kind.name}")
        deadline = time.monotonic() + self.recovery_timeout
        fresh_status(self.ctx.state, deadline)
        while time.monotonic() < deadline:
            if recovered(self.ctx.state, self.ctx.topology, record.target):
                record.recovered_at = self._now()
                break
            time.sleep(0.5)
        if record.recovered_at is None:
            self.log(f"{self._now():7.1f}s {kind.name}: NOT recovered in time; going on")
        else:
            self.log(f"{self._now():7.1f}s recovered from {kind.name}")

    def heal_all(self) -> None:
        """Lift every fault still injected (each once), however we got here."""
        while self._active:
            record, injection = self._active.pop()
            try:
                injection.heal()
            finally:
                record.healed_at = self._now()
