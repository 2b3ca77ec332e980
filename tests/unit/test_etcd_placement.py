"""Where etcd's raft leader should go, decided from the members' own statuses."""

from __future__ import annotations

from regions.etcd_placement import MemberStatus, choose_target, cluster_leader, sync_standbys

IDS = {"us-east": "11", "us-west": "22", "eu-west": "33"}


def statuses(
    leader: str, term: str = "7", silent: tuple[str, ...] = ()
) -> dict[str, MemberStatus | None]:
    return {r: None if r in silent else MemberStatus(IDS[r], IDS[leader], term) for r in IDS}


def test_moves_from_the_database_leaders_region_to_the_asynchronous_replica() -> None:
    assert choose_target(statuses("us-east"), "us-east", {"us-west"}) == ("us-east", "eu-west")
    assert choose_target(statuses("us-east"), "us-east", {"eu-west"}) == ("us-east", "us-west")


def test_falls_back_to_the_synchronous_standby_when_the_other_member_is_silent() -> None:
    view = statuses("us-east", silent=("eu-west",))
    assert choose_target(view, "us-east", {"us-west"}) == ("us-east", "us-west")


def test_leaves_a_leader_elsewhere_alone() -> None:
    assert choose_target(statuses("us-west"), "us-east", {"us-west"}) is None


def test_never_moves_without_a_database_leader() -> None:
    # during a failover, the renewal of every lease would delay the election
    assert choose_target(statuses("us-east"), None, set()) is None


def test_never_moves_while_the_members_disagree() -> None:
    view = statuses("us-east")
    view["eu-west"] = MemberStatus(IDS["eu-west"], IDS["eu-west"], "8")  # a partition
    assert choose_target(view, "us-east", {"us-west"}) is None
    view["eu-west"] = MemberStatus(IDS["eu-west"], IDS["us-east"], "8")  # a new term
    assert choose_target(view, "us-east", {"us-west"}) is None


def test_needs_a_second_member_to_hand_over_to() -> None:
    view = statuses("us-east", silent=("us-west", "eu-west"))
    assert choose_target(view, "us-east", set()) is None


def test_sync_standbys_come_from_patronis_cluster_view() -> None:
    cluster = {
        "members": [
            {"name": "us-east", "role": "leader"},
            {"name": "us-west", "role": "sync_standby"},
            {"name": "eu-west", "role": "replica"},
        ]
    }
    assert sync_standbys(cluster) == {"us-west"}
    assert sync_standbys(None) == set()


def test_the_leader_comes_from_patronis_cluster_view_when_it_is_running() -> None:
    cluster = {
        "members": [
            {"name": "us-east", "role": "leader", "state": "running"},
            {"name": "us-west", "role": "sync_standby", "state": "streaming"},
        ]
    }
    assert cluster_leader(cluster) == "us-east"
    cluster["members"][0]["state"] = "stopped"
    assert cluster_leader(cluster) is None
    assert cluster_leader({"members": []}) is None
    assert cluster_leader(None) is None
