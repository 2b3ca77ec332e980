"""The nemesis schedule and registry, with fault kinds registered by the test that record
what was injected and healed (the real kinds are exercised in tests/e2e/test_bank_check.py)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from regions import drills, nemesis, topology
from regions.nemesis import FaultContext, FaultKind, Injection, Nemesis


@dataclass
class Log:
    events: list[str] = field(default_factory=list)


@dataclass
class Recorded:
    target: str
    log: Log

    def heal(self) -> None:
        self.log.events.append(f"heal {self.target}")


@pytest.fixture
def log() -> Iterator[Log]:
    """Two test kinds in the registry for the duration of one test."""
    log = Log()

    def kind(name: str, hold: float) -> FaultKind:
        def inject(_ctx: FaultContext) -> Injection:
            log.events.append(f"inject {name}")
            return Recorded(name, log)

        return FaultKind(name, f"test kind {name}", hold, inject)

    def unavailable(_ctx: FaultContext) -> str | None:
        return "cannot run in a unit test"

    def raises(_ctx: FaultContext) -> Injection:
        raise nemesis.FaultUnavailable("found out only when injecting")

    nemesis.register(kind("t-quick", 0.0))
    nemesis.register(kind("t-long", 30.0))
    nemesis.register(FaultKind("t-never", "", 0.0, raises, unavailable))
    nemesis.register(FaultKind("t-late", "", 0.0, raises))
    try:
        yield log
    finally:
        for name in ("t-quick", "t-long", "t-never", "t-late"):
            nemesis.FAULT_KINDS.pop(name, None)


def make(tmp_path: Path, kinds: list[str], hold: float | None = None) -> Nemesis:
    ctx = FaultContext(tmp_path, topology.load(), random.Random(1))
    return Nemesis(ctx, kinds, hold=hold, gap=0.0, recovery_timeout=0.2)


def test_parse_kinds() -> None:
    assert nemesis.parse_kinds("all") == list(nemesis.FAULT_KINDS)
    assert nemesis.parse_kinds("none") == []
    assert nemesis.parse_kinds("region-kill, service-kill,region-kill") == [
        "region-kill",
        "service-kill",
    ]
    with pytest.raises(nemesis.NemesisError, match=r"unknown fault kind.*meteor"):
        nemesis.parse_kinds("service-kill,meteor")


def test_every_issue_fault_kind_is_registered() -> None:
    assert set(nemesis.FAULT_KINDS) >= {
        "service-kill",
        "service-pause",
        "db-leader-kill",
        "leader-pause",
        "region-kill",
        "region-partition",
    }


def test_the_first_round_runs_every_kind_even_past_the_deadline(tmp_path: Path, log: Log) -> None:
    nem = make(tmp_path, ["t-quick", "t-long"], hold=0.0)
    nem.run(until=0.0)
    assert log.events == ["inject t-quick", "heal t-quick", "inject t-long", "heal t-long"]
    assert [r.kind for r in nem.records] == ["t-quick", "t-long"]
    assert all(r.healed_at is not None for r in nem.records)
    # No status file, so nothing can be seen recovering: recorded as such, not faked.
    assert all(r.recovered_at is None for r in nem.records)


def test_rounds_go_on_while_the_duration_lasts(tmp_path: Path, log: Log) -> None:
    nem = make(tmp_path, ["t-quick"])
    nem.run(until=1.0)
    assert len(nem.records) >= 2
    assert log.events.count("inject t-quick") == log.events.count("heal t-quick")


def test_stop_during_a_hold_heals_at_once(tmp_path: Path, log: Log) -> None:
    nem = make(tmp_path, ["t-long"])
    runner = threading.Thread(target=nem.run, args=(60.0,))
    started = time.monotonic()
    runner.start()
    while "inject t-long" not in log.events:
        time.sleep(0.01)
    nem.stop()
    runner.join(10)
    assert not runner.is_alive()
    assert time.monotonic() - started < 30  # well before the 30 s hold ended
    assert log.events == ["inject t-long", "heal t-long"]


def test_heal_all_heals_each_injection_once(tmp_path: Path, log: Log) -> None:
    nem = make(tmp_path, ["t-long"])
    runner = threading.Thread(target=nem.run, args=(60.0,))
    runner.start()
    while "inject t-long" not in log.events:
        time.sleep(0.01)
    nem.heal_all()  # what bank_check.run's `finally` does on an error or Ctrl-C
    nem.heal_all()
    nem.stop()
    runner.join(10)
    assert log.events == ["inject t-long", "heal t-long"]


def test_unavailable_kinds_are_skipped_with_their_reason(tmp_path: Path, log: Log) -> None:
    nem = make(tmp_path, ["t-never", "t-late", "t-quick"])
    assert nem.skipped == {"t-never": "cannot run in a unit test"}
    nem.run(until=0.0)
    assert nem.skipped["t-late"] == "found out only when injecting"
    assert [r.kind for r in nem.records] == ["t-quick"]
    assert log.events == ["inject t-quick", "heal t-quick"]


def test_region_partition_says_why_it_cannot_run(tmp_path: Path) -> None:
    nem = make(tmp_path, ["region-partition"])
    if nemesis.PARTITION not in drills.DRILLS:
        assert "no 'region-partition' drill" in nem.skipped["region-partition"]
    else:
        # No namespaces here, or (as root) a state folder with no network recorded: a
        # deployment that was not started in netns mode.
        assert "network namespaces" in nem.skipped["region-partition"]
