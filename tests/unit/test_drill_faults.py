"""The leader-pause fault on real processes: a stand-in postmaster that keeps forking."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from regions import drills, local

# Forks a child every 10 ms (as a postmaster does for each new connection), each child
# lives a second: a pause that lists the processes before stopping the parent misses some.
FORKER = """
import os, time
while True:
    if os.fork() == 0:
        time.sleep(1.0)
        os._exit(0)
    time.sleep(0.01)
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
"""


def _state(pid: int) -> str:
    fields = local.proc_stat(pid)
    assert fields is not None, f"process {pid} is gone"
    return fields[0]


@pytest.fixture
def member(tmp_path: Path) -> Iterator[tuple[Path, list[subprocess.Popen[bytes]]]]:
    patroni = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    postmaster = subprocess.Popen([sys.executable, "-c", FORKER])
    data = tmp_path / "db" / "us-east" / "data"
    data.mkdir(parents=True)
    (data / "postmaster.pid").write_text(f"{postmaster.pid}\n{data}\n")
    status = {"processes": [{"region": "us-east", "role": "db", "pid": patroni.pid}]}
    (tmp_path / "status.json").write_text(json.dumps(status))
    deadline = time.monotonic() + 20
    while len(drills.process_tree(postmaster.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # until the forker has children
    try:
        yield tmp_path, [patroni, postmaster]
    finally:
        for proc in (postmaster, patroni):
            for pid in drills.process_tree(proc.pid):
                with contextlib.suppress(ProcessLookupError):  # a child that just exited
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_leader_pause_stops_every_process_of_a_forking_postmaster(
    member: tuple[Path, list[subprocess.Popen[bytes]]],
) -> None:
    state, (patroni, postmaster) = member
    fault = drills.Fault("leader-pause", state, "us-east")
    before = time.monotonic()
    landed = fault.start()
    assert before <= landed <= time.monotonic()  # the first SIGSTOP, outages count from it
    try:
        time.sleep(0.2)
        tree = {*drills.process_tree(postmaster.pid), *drills.process_tree(patroni.pid)}
        assert len(tree) > 2
        running = {pid: _state(pid) for pid in tree if _state(pid) != "T"}
        assert running == {}
    finally:
        fault.stop()
    time.sleep(0.2)
    assert _state(postmaster.pid) != "T"
    assert _state(patroni.pid) != "T"


def test_leader_pause_refuses_a_region_without_a_postmaster(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text(
        json.dumps({"processes": [{"region": "us-east", "role": "db", "pid": os.getpid()}]})
    )
    with pytest.raises(drills.DrillError, match="no running Patroni and PostgreSQL"):
        drills.Fault("leader-pause", tmp_path, "us-east").start()
