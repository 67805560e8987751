"""Trainings admitted by the cluster's room: only as many start as can run, the others wait here.

A comparison starts every seed of every arm at once (:class:`workers.search.seeds.SeedGroup`).
Started, each is a Ray Train controller process that polls for its workers' placement until Ray
can place them: 45 trainings on a 2-core machine were 43 such processes, 10 GB of memory and about
15% of the CPU taken from the 2 that trained. So on a cluster that cannot grow (a local Ray, no
autoscaler) a seed first takes a slot from the search's :class:`TrainingSlots` actor: there are as
many slots as the nodes hold trainings (:func:`training_capacity`) plus one, so one more is
prepared when one ends. Slots go to the lowest seed first, then in order of arrival: every arm of
seed 0 runs before seed 1's, so an interrupted comparison leaves whole pairs. On an autoscaling
cluster nothing is held back: the waiting trainings' resource requests are what makes it grow.

A slot's holder then asks to start (:meth:`TrainingSlots.begin`) before it reserves its resources:
only as many start as the nodes hold. The prepared one reserves its placement group only once a
training has freed its own, so no group waits in Ray's queue, where a newer group created as a
CPU frees is placed before one that waits (Ray retries waiting groups after a back-off).

A slot is a lease renewed by its group while it trains (:data:`LEASE_S`): a process that died
holding one gives it back when the lease runs out.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.spec import Spec

__all__ = [
    "LEASE_S",
    "SlotQueue",
    "TrainingSlots",
    "start_training_slots",
    "training_capacity",
    "warm_pool_for",
]

#: how long a slot stays held without a renewal (its group renews it every LEASE_S / 4).
LEASE_S = 120.0


class SlotQueue:
    """The slots and the queue for them (plain Python; :class:`TrainingSlots` is its actor).

    Args:
        capacity: slots (trainings prepared or running at once).
        lease_s: a held slot without a renewal for this long is free again.
        clock: the time source (monotonic seconds).
        running: of the slots' holders, how many may start at once (:meth:`start`; default all).
    """

    def __init__(
        self,
        capacity: int,
        lease_s: float = LEASE_S,
        clock: Callable[[], float] = time.monotonic,
        running: int | None = None,
    ):
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        if running is not None and not 1 <= running <= capacity:
            raise ValueError(f"running: must be in [1, capacity={capacity}], got {running}")
        self.capacity, self.lease_s, self.clock = capacity, lease_s, clock
        self.running_cap = capacity if running is None else running
        self.running: set[str] = set()  # holders that started
        self.held: dict[str, float] = {}  # key -> when its lease runs out
        self.waiting: dict[str, tuple[int, int]] = {}  # key -> (rank, arrival)
        self._arrivals = itertools.count()
        self.peak = 0
        self.granted = 0
        self.expired = 0

    def request(self, key: str, rank: int) -> bool:
        """Ask for a slot (again): True once ``key`` holds one. Lower ranks go first, then arrival."""
        now = self._expire()
        if key in self.held:
            return True
        self.waiting.setdefault(key, (rank, next(self._arrivals)))
        free = self.capacity - len(self.held)
        for k in sorted(self.waiting, key=self.waiting.__getitem__)[: max(free, 0)]:
            del self.waiting[k]
            self.held[k] = now + self.lease_s
            self.granted += 1
        self.peak = max(self.peak, len(self.held))
        return key in self.held

    def _expire(self) -> float:
        """Free the slots whose lease ran out; returns the time now."""
        now = self.clock()
        for k in [k for k, until in self.held.items() if until <= now]:
            del self.held[k]
            self.running.discard(k)
            self.expired += 1
        return now

    def start(self, key: str) -> bool:
        """Ask to start (again): True once ``key``, holding a slot, is one of the ``running`` that may
        reserve their resources."""
        self._expire()
        if key in self.running:
            return True
        if key not in self.held or len(self.running) >= self.running_cap:
            return False
        self.running.add(key)
        return True

    def renew(self, keys: Iterable[str]) -> None:
        """Extend the leases of ``keys`` that hold a slot."""
        until = self.clock() + self.lease_s
        for k in keys:
            if k in self.held:
                self.held[k] = until

    def release(self, key: str) -> None:
        """Give back ``key``'s slot, or leave the queue."""
        self.held.pop(key, None)
        self.running.discard(key)
        self.waiting.pop(key, None)

    def stats(self) -> dict[str, int]:
        return {"capacity": self.capacity, "peak": self.peak, "granted": self.granted, "expired": self.expired,
                "held": len(self.held), "running": len(self.running), "waiting": len(self.waiting)}  # fmt: skip


class TrainingSlots:
    """The search's slots as an async Ray actor: :meth:`acquire` waits (up to a timeout, so that the
    caller can notice a stop) until the key holds a slot, :meth:`begin` until it may start."""

    def __init__(self, capacity: int, lease_s: float = LEASE_S, running: int | None = None):
        self._queue = SlotQueue(capacity, lease_s, running=running)
        self._changed: Any = None

    def _condition(self) -> Any:
        import asyncio

        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _wait(self, granted: Callable[[], bool], timeout_s: float) -> bool:
        """Whether ``granted()`` came true within ``timeout_s`` (asked again at every change)."""
        import asyncio

        cond = self._condition()
        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(granted), timeout_s)
            except TimeoutError:
                return False
            return True

    async def acquire(self, key: str, rank: int, timeout_s: float = 5.0) -> bool:
        return await self._wait(lambda: self._queue.request(key, rank), timeout_s)

    async def begin(self, key: str, timeout_s: float = 5.0) -> bool:
        return await self._wait(lambda: self._queue.start(key), timeout_s)

    async def release(self, key: str) -> None:
        cond = self._condition()
        async with cond:
            self._queue.release(key)
            cond.notify_all()

    async def renew(self, keys: list[str]) -> None:
        self._queue.renew(keys)

    async def stats(self) -> dict[str, int]:
        return self._queue.stats()


def training_capacity(spec: Spec) -> int | None:
    """How many trainings of ``spec`` the connected Ray's nodes hold at once (each node's CPUs, GPUs,
    memory and accelerator type, :func:`workers.resources.workers_held`); None when the cluster can
    grow (an autoscaler may add nodes for trainings that wait) or no node is known."""
    from workers.env import ray_has_no_autoscaler
    from workers.resources import alive_nodes, resolve_use_gpu, worker_bundle, workers_held

    if not ray_has_no_autoscaler():
        return None
    bundle = worker_bundle(spec, resolve_use_gpu(spec))
    workers = sum(workers_held(node, bundle) for node in alive_nodes())
    return workers // spec.scaling.num_workers if workers else None


def warm_pool_for(spec: Spec, storage_path: str) -> list[Any]:
    """:func:`workers.training.pooled.warm_pool` with as many processes as ``spec``'s trainings run at
    once on this one-machine Ray, at most one per core (importing is CPU-bound: more would only
    delay the first trainings), when they run pooled; nothing on a cluster that grows or for Ray
    Train's trainings."""
    from workers.resources import resolve_use_gpu, worker_bundle
    from workers.training.pooled import uses_pool, warm_pool

    use_gpu = resolve_use_gpu(spec)
    if not uses_pool(spec, storage_path, use_gpu):
        return []
    capacity = training_capacity(spec)
    if not capacity:
        return []
    return warm_pool(min(capacity, os.cpu_count() or 1), float(worker_bundle(spec, use_gpu).get("CPU", 1.0)))


def start_training_slots(spec: Spec) -> Any:
    """A :class:`TrainingSlots` actor (no CPU reserved) with :func:`training_capacity` + 1 slots, as
    many of them running at once as the capacity, on this node; None when nothing is held back."""
    capacity = training_capacity(spec)
    if capacity is None:
        return None
    from workers.training.controller_hooks import start_on_this_node

    return start_on_this_node(TrainingSlots, max(capacity, 1) + 1, LEASE_S, max(capacity, 1))
