"""The guard against Patroni issue #3675: which stuck standby gets restarted, and when."""

from __future__ import annotations

from pathlib import Path

import pytest

from regions.standby_guard import StandbyGuard, streams_from_somewhere

STARTING = {"state": "starting", "role": "replica"}
RUNNING = {"state": "running", "role": "replica"}


@pytest.fixture
def data_dirs(tmp_path: Path) -> dict[str, Path]:
    dirs = {}
    for region in ("us-east", "us-west", "eu-west"):
        (tmp_path / region).mkdir()
        (tmp_path / region / "postgresql.conf").write_text(
            "hot_standby = 'on'\nprimary_conninfo = 'host=127.0.0.1 port=5432 user=replicator'\n"
        )
        dirs[region] = tmp_path / region
    return dirs


def strand(data_dir: Path) -> None:
    """What Patroni writes in the bug: recovery settings, but no server to stream from."""
    (data_dir / "postgresql.conf").write_text(
        "hot_standby = 'on'\nrecovery_target_timeline = 'latest'\n"
    )


def test_a_stranded_standby_is_restarted_once_it_has_been_stuck_long_enough(
    data_dirs: dict[str, Path],
) -> None:
    strand(data_dirs["eu-west"])
    guard = StandbyGuard(stuck_after=20)
    members = {"us-east": RUNNING, "us-west": {"state": "running"}, "eu-west": STARTING}
    assert guard.observe(100.0, members, "us-west", data_dirs) == []
    assert guard.observe(119.0, members, "us-west", data_dirs) == []
    assert guard.observe(120.0, members, "us-west", data_dirs) == ["eu-west"]
    # Restarted: the clock starts again for the new Patroni.
    assert guard.observe(121.0, members, "us-west", data_dirs) == []
    assert guard.observe(141.0, members, "us-west", data_dirs) == ["eu-west"]


def test_a_slow_standby_that_streams_is_left_alone(data_dirs: dict[str, Path]) -> None:
    guard = StandbyGuard(stuck_after=20)
    members = {"us-east": RUNNING, "eu-west": STARTING}
    assert guard.observe(0.0, members, "us-west", data_dirs) == []
    assert guard.observe(600.0, members, "us-west", data_dirs) == []


def test_no_restart_without_a_leader_to_follow(data_dirs: dict[str, Path]) -> None:
    """With no leader a restart would start it with no primary_conninfo again."""
    strand(data_dirs["eu-west"])
    guard = StandbyGuard(stuck_after=20)
    members = {"eu-west": STARTING}
    assert guard.observe(0.0, members, None, data_dirs) == []
    assert guard.observe(60.0, members, None, data_dirs) == []
    assert guard.observe(61.0, members, "us-east", data_dirs) == ["eu-west"]


def test_leaving_the_starting_state_resets_the_clock(data_dirs: dict[str, Path]) -> None:
    strand(data_dirs["eu-west"])
    guard = StandbyGuard(stuck_after=20)
    assert guard.observe(0.0, {"eu-west": STARTING}, "us-east", data_dirs) == []
    assert guard.observe(15.0, {"eu-west": RUNNING}, "us-east", data_dirs) == []
    assert guard.observe(16.0, {"eu-west": STARTING}, "us-east", data_dirs) == []
    assert guard.observe(35.0, {"eu-west": STARTING}, "us-east", data_dirs) == []
    assert guard.observe(36.0, {"eu-west": STARTING}, "us-east", data_dirs) == ["eu-west"]


def test_a_missed_answer_does_not_restart_the_clock(data_dirs: dict[str, Path]) -> None:
    """A loaded Patroni misses a short request now and then; the member is still stuck."""
    strand(data_dirs["eu-west"])
    guard = StandbyGuard(stuck_after=20)
    assert guard.observe(0.0, {"eu-west": STARTING}, "us-east", data_dirs) == []
    assert guard.observe(10.0, {"eu-west": None}, "us-east", data_dirs) == []
    assert guard.observe(20.0, {"eu-west": STARTING}, "us-east", data_dirs) == ["eu-west"]


def test_a_member_silent_for_long_starts_its_clock_afresh(data_dirs: dict[str, Path]) -> None:
    strand(data_dirs["eu-west"])
    guard = StandbyGuard(stuck_after=20)
    assert guard.observe(0.0, {"eu-west": STARTING}, "us-east", data_dirs) == []
    assert guard.observe(30.0, {"eu-west": None}, "us-east", data_dirs) == []  # killed
    assert guard.observe(60.0, {"eu-west": STARTING}, "us-east", data_dirs) == []  # back
    assert guard.observe(80.0, {"eu-west": STARTING}, "us-east", data_dirs) == ["eu-west"]


def test_the_leader_itself_is_never_restarted(data_dirs: dict[str, Path]) -> None:
    strand(data_dirs["us-east"])
    guard = StandbyGuard(stuck_after=1)
    members = {"us-east": STARTING}
    assert guard.observe(0.0, members, "us-east", data_dirs) == []
    assert guard.observe(10.0, members, "us-east", data_dirs) == []


def test_primary_conninfo_is_read_from_either_configuration_file(tmp_path: Path) -> None:
    assert streams_from_somewhere(tmp_path) is False  # no files at all
    (tmp_path / "postgresql.conf").write_text("primary_conninfo = ''\n")
    assert streams_from_somewhere(tmp_path) is False  # empty: nowhere
    (tmp_path / "postgresql.auto.conf").write_text("primary_conninfo = 'host=10.0.0.1'\n")
    assert streams_from_somewhere(tmp_path) is True
