"""The slots that admit trainings as the cluster's room allows (workers.search.slots): lowest seed
first, then arrival; only as many holders start as run at once; a lease that is not renewed frees
its slot."""

from __future__ import annotations

import pytest

from workers.search.slots import SlotQueue

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_slots_go_to_the_lowest_seed_first_and_no_more_than_the_capacity():
    q = SlotQueue(2, lease_s=60, clock=Clock())
    # every arm's seeds ask at once, seed 1 of arm a before seed 0 of arm b
    asked = [("a-seed1", 1), ("a-seed0", 0), ("b-seed1", 1), ("b-seed0", 0)]
    got = {key: q.request(key, rank) for key, rank in asked}
    assert got == {"a-seed1": True, "a-seed0": True, "b-seed1": False, "b-seed0": False}
    # the first two asked before anyone waited; from now on rank rules: b-seed0 before b-seed1
    q.release("a-seed1")
    assert q.request("b-seed1", 1) is False and "b-seed0" in q.held
    assert q.stats() == {
        "capacity": 2, "peak": 2, "granted": 3, "expired": 0, "held": 2, "running": 0, "waiting": 1
    }  # fmt: skip
    q.release("a-seed0")
    assert q.request("b-seed1", 1) is True and q.peak == 2


def test_a_slot_whose_lease_is_not_renewed_is_free_again():
    clock = Clock()
    q = SlotQueue(1, lease_s=60, clock=clock)
    assert q.request("dead", 0)  # its process dies holding the slot
    assert q.request("alive", 1) is False
    clock.now = 45
    q.renew(["dead"])  # renewed at 45: held until 105
    clock.now = 100
    assert q.request("alive", 1) is False
    clock.now = 106
    assert q.request("alive", 1) is True and q.stats()["expired"] == 1


def test_leaving_the_queue_gives_the_place_to_the_next():
    q = SlotQueue(1, clock=Clock())
    assert q.request("a", 0)
    assert q.request("b", 0) is False and q.request("c", 1) is False
    q.release("b")  # a stopped trial's seed that was waiting
    q.release("a")
    assert q.request("c", 1) is True
    with pytest.raises(ValueError, match="capacity"):
        SlotQueue(0)


def test_of_the_holders_only_the_running_many_start_and_the_prepared_one_starts_when_one_ends():
    clock = Clock()
    q = SlotQueue(3, lease_s=60, clock=clock, running=2)
    assert all(q.request(key, rank) for rank, key in enumerate("abc"))
    assert q.start("a") and q.start("b")
    assert q.start("c") is False  # prepared, waiting for a running training to end
    assert q.start("a") is True  # asking again changes nothing
    q.release("a")
    assert q.start("c") is True and q.stats()["running"] == 2
    assert q.start("d") is False  # holds no slot
    clock.now = 61  # b and c stop renewing their leases: their places go back
    assert q.request("d", 3) and q.start("d") and q.stats()["running"] == 1
    with pytest.raises(ValueError, match="running"):
        SlotQueue(2, running=3)
