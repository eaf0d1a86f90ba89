"""The scheduler on its own: order, aging, deadlines, cancel, limits, affinity.

Deterministic: no device thread; jobs are put, then taken with get(0) one
by one, and times are set on the jobs directly.
"""
from __future__ import annotations

import time

import pytest

from hailo_devmgr.wire.protocol import BUSY, CANCELLED, TIMEOUT, RequestError
from hailo_devmgr.daemon.scheduler import PRIORITIES, FairScheduler, FifoQueue, Job, QueueLimits

INTERACTIVE, NORMAL, BATCH = (PRIORITIES.index(name) for name in ("interactive", "normal", "batch"))


def job(name, client="a", priority=NORMAL, **fields) -> Job:
    return Job(fn=lambda: name, label=name, budget_s=1, priority=priority, client=client, owner=client,
               request_id=name, **fields)


def drain(queue) -> list[str]:
    order = []
    while (taken := queue.get(0)) is not None:
        order.append(taken.label)
    return order


def test_higher_class_runs_first_and_fifo_within_a_client():
    queue = FairScheduler()
    for item in (job("b1", priority=BATCH), job("n1"), job("i1", priority=INTERACTIVE), job("n2")):
        queue.put(item)
    assert drain(queue) == ["i1", "n1", "n2", "b1"]


def test_round_robin_across_clients_within_a_class():
    queue = FairScheduler()
    for index in range(5):
        queue.put(job(f"greedy{index}", client="greedy"))
    queue.put(job("polite0", client="polite"))
    queue.put(job("polite1", client="polite"))
    order = drain(queue)
    # The polite client waits behind one greedy job, not five.
    assert order[:4] == ["greedy0", "polite0", "greedy1", "polite1"]
    assert order[4:] == ["greedy2", "greedy3", "greedy4"]


def test_aging_promotes_a_waiting_batch_job_within_the_documented_bound():
    queue = FairScheduler(QueueLimits(aging_s=1.0))
    old_batch = job("old-batch", client="b", priority=BATCH)
    old_batch.enqueued_at = time.monotonic() - 2.01  # waited 2 x aging_s: now counts as interactive
    queue.put(old_batch)
    queue.put(job("fresh-interactive", client="i", priority=INTERACTIVE))
    queue.put(job("fresh-normal", client="n"))
    # Interactive now, and the older of the two interactive jobs: first.
    assert drain(queue) == ["old-batch", "fresh-interactive", "fresh-normal"]

    queue = FairScheduler(QueueLimits(aging_s=1.0))
    young = job("young-batch", client="y", priority=BATCH)
    young.enqueued_at = time.monotonic() - 0.5
    queue.put(young)
    queue.put(job("fresh-normal", client="n"))
    assert drain(queue) == ["fresh-normal", "young-batch"]   # not promoted yet


def test_a_job_past_its_deadline_is_answered_timeout_and_never_taken():
    queue = FairScheduler()
    late = job("late", deadline=time.monotonic() - 0.001)
    queue.put(late)
    queue.put(job("on-time", client="b"))
    assert drain(queue) == ["on-time"]
    with pytest.raises(RequestError) as info:
        late.future.result(0)
    assert info.value.code == TIMEOUT


def test_remove_answers_the_job_and_it_never_runs():
    queue = FairScheduler()
    doomed, kept = job("doomed"), job("kept")
    queue.put(doomed)
    queue.put(kept)
    assert queue.find("a", "doomed") is doomed
    assert queue.remove(doomed, RequestError(CANCELLED, "Cancelled by the client"))
    assert not queue.remove(doomed, RequestError(CANCELLED, "again"))  # no longer waiting
    assert drain(queue) == ["kept"]
    assert doomed.future.exception(0).code == CANCELLED


def test_dropping_an_owner_cancels_only_its_waiting_jobs():
    queue = FairScheduler()
    mine = [job(f"gone{index}", client="gone") for index in range(3)]
    for item in (*mine, job("stays", client="other")):
        queue.put(item)
    assert queue.drop_owner("gone") == 3
    assert drain(queue) == ["stays"]
    assert all(item.future.cancelled() for item in mine)


def test_queue_limits_answer_busy_with_a_retry_estimate():
    queue = FairScheduler(QueueLimits(max_queue=3, max_queue_per_client=2))
    queue.record_run(0.1)
    queue.put(job("a1"))
    queue.put(job("a2"))
    with pytest.raises(RequestError) as per_client:
        queue.put(job("a3"))
    assert per_client.value.code == BUSY and per_client.value.retry_after_ms > 0
    queue.put(job("b1", client="b"))
    with pytest.raises(RequestError) as total:
        queue.put(job("b2", client="b"))  # full, and b holds its share (3 // 2 clients)
    assert total.value.code == BUSY and "queue is full" in total.value.message
    assert total.value.retry_after_ms == 180  # 3 requests ahead x the 60 ms average
    assert len(queue) == 3  # nothing was silently dropped or added


def fill(queue, client, count, priority=NORMAL) -> list[Job]:
    jobs = [job(f"{client}{index}", client=client, priority=priority) for index in range(count)]
    for item in jobs:
        queue.put(item)
    return jobs


def test_a_full_queue_admits_a_client_below_its_share_by_displacing_the_heaviest():
    queue = FairScheduler(QueueLimits(max_queue=4, max_queue_per_client=4))
    queue.record_run(0.1)
    hog = fill(queue, "hog", 4, priority=BATCH)
    queue.put(job("victim", client="victim", priority=INTERACTIVE))
    assert queue.depth_by_client() == {"hog": 3, "victim": 1}
    # The hog's newest request is answered busy, as a refused one is, and never runs.
    refusal = hog[-1].future.exception(0)
    assert refusal.code == BUSY and "fair share" in refusal.message
    assert refusal.retry_after_ms == 180  # its 3 requests still ahead x the 60 ms average
    assert not queue.remove(hog[-1], RequestError(CANCELLED, "too late"))
    assert drain(queue) == ["victim", "hog0", "hog1", "hog2"]


def test_two_clients_filling_the_queue_cannot_lock_a_third_out():
    queue = FairScheduler(QueueLimits(max_queue=6, max_queue_per_client=3))
    first, second = fill(queue, "first", 3), fill(queue, "second", 3)
    fill(queue, "third", 2)  # its share: 6 // 3 clients
    assert queue.depth_by_client() == {"first": 2, "second": 2, "third": 2}
    # Equally heavy: the one that queued last gave way first.
    assert second[-1].future.exception(0).code == BUSY and first[-1].future.exception(0).code == BUSY
    for client in ("third", "first", "second"):  # each at its share: nobody displaces anybody
        with pytest.raises(RequestError) as full:
            queue.put(job("more", client=client))
        assert full.value.code == BUSY and "queue is full" in full.value.message
    assert queue.depth_by_client() == {"first": 2, "second": 2, "third": 2}


def test_priority_buys_no_larger_share_and_the_displaced_job_is_the_holders_least_urgent():
    queue = FairScheduler(QueueLimits(max_queue=4, max_queue_per_client=4))
    older_batch = job("older-batch", client="hog", priority=BATCH)
    queue.put(older_batch)
    urgent = fill(queue, "hog", 3, priority=INTERACTIVE)
    queue.put(job("modest", client="modest", priority=BATCH))
    assert older_batch.future.exception(0).code == BUSY  # not the hog's newer interactive ones
    queue.put(job("modest2", client="modest", priority=BATCH))
    assert urgent[-1].future.exception(0).code == BUSY   # the hog had only interactive left
    with pytest.raises(RequestError):  # interactive does not win the slots back
        queue.put(job("hog-again", client="hog", priority=INTERACTIVE))
    assert queue.depth_by_client() == {"hog": 2, "modest": 2}


@pytest.mark.parametrize("seed", range(5))
def test_every_client_that_keeps_asking_ends_with_at_least_its_share(seed):
    """Whatever the order of arrivals, a full queue ends split fairly."""
    import random
    chance = random.Random(seed)
    queue = FairScheduler(QueueLimits(max_queue=32, max_queue_per_client=20))
    clients = ["a", "b", "c", "d", "e"]
    for index in range(400):
        client = chance.choice(clients)
        try:
            queue.put(job(f"{client}{index}", client=client, priority=chance.randrange(3)))
        except RequestError as error:
            assert error.code == BUSY
    for client in clients:  # then everyone asks until refused
        while True:
            try:
                queue.put(job(f"{client}-last", client=client))
            except RequestError:
                break
    depths = queue.depth_by_client()
    assert len(queue) == 32 and min(depths.values()) >= 32 // len(clients)
    assert max(depths.values()) - min(depths.values()) <= 32 % len(clients) + 1


def test_affinity_prefers_loaded_models_within_its_bound():
    loaded = frozenset({"generic:/warm.hef"})
    queue = FairScheduler(QueueLimits(affinity_max_skips=2), loaded_keys=lambda: loaded)
    cold = job("cold", client="a", model_key="generic:/cold.hef")
    queue.put(cold)
    for index in range(4):
        queue.put(job(f"warm{index}", client="b", model_key="generic:/warm.hef"))
    order = drain(queue)
    # The cold job is passed over twice (the bound), then runs.
    assert order[:3] == ["warm0", "warm1", "cold"]
    assert cold.skips == 2


def test_depth_by_class_and_client():
    queue = FairScheduler()
    queue.put(job("x", client=11, priority=BATCH))
    queue.put(job("y", client=11))
    queue.put(job("z", client=12, priority=INTERACTIVE))
    assert queue.depth_by_class() == {"interactive": 1, "normal": 1, "batch": 1}
    assert queue.depth_by_client() == {"11": 2, "12": 1}


def test_fifo_keeps_arrival_order_whatever_the_priority():
    queue = FifoQueue()
    for item in (job("b", priority=BATCH), job("i", client="z", priority=INTERACTIVE), job("n")):
        queue.put(item)
    assert drain(queue) == ["b", "i", "n"]


def test_a_job_outcome_is_the_first_one_given():
    """A job its waiter cancelled and the queue then expired (or the device
    thread then finished) keeps its first outcome, and nobody raises."""
    from hailo_devmgr.daemon.jobs import JobFuture
    cancelled = JobFuture()
    assert cancelled.cancel() and cancelled.cancel()
    assert not cancelled.set_exception(RuntimeError("expired")) and cancelled.cancelled()
    assert not cancelled.set_running_or_notify_cancel()   # never runs
    running = JobFuture()
    assert running.set_running_or_notify_cancel()
    assert not running.cancel()                         # too late: it runs to the end
    seen = []
    running.add_done_callback(lambda done: seen.append(done.result()))
    assert running.set_result(42) and not running.set_result(43)
    assert seen == [42] and running.result(0) == 42
    running.add_done_callback(lambda done: seen.append("at once"))
    assert seen == [42, "at once"]


def test_a_blocking_wait_for_a_job_ends_when_another_thread_settles_it():
    import threading
    from hailo_devmgr.daemon.jobs import JobFuture
    future = JobFuture()
    with pytest.raises(TimeoutError):
        future.result(0.01)
    threading.Timer(0.05, future.set_exception, [ValueError("failed")]).start()
    assert isinstance(future.exception(5), ValueError)
    with pytest.raises(ValueError):
        future.result(0)


@pytest.mark.parametrize("policy", [FairScheduler, FifoQueue])
def test_a_client_past_its_untaken_bytes_waits_while_the_others_run(policy):
    """Results made and answers not yet written count against the client
    from the moment the device thread makes them: past the bound its waiting
    jobs do not start, until its answers are made and read."""
    queue = policy(QueueLimits(max_untaken_bytes=1000))
    for item in (job("slow1", client="slow"), job("fast1", client="fast"), job("slow2", client="slow"),
                 job("slow3", client="slow")):
        queue.put(item)
    first = queue.get(0)
    assert first.label == "slow1"
    queue.job_done(first, 1500)                  # one large result: the client is past its bound
    assert drain(queue) == ["fast1"] and len(queue) == 2
    queue.answer_made(first)                     # its answer is made ...
    queue.unread("slow", 1200)                   # ... and its socket takes none of it
    assert queue.get(0) is None
    queue.unread("slow", -1200)                  # written
    assert drain(queue) == ["slow2", "slow3"]


def test_a_result_whose_request_is_gone_counts_for_nothing():
    queue = FairScheduler(QueueLimits(max_untaken_bytes=1000))
    gone, other = job("gone"), job("other")
    queue.put(gone)
    queue.put(other)
    taken = queue.get(0)
    queue.answer_made(taken)                     # the request ended while its job ran
    queue.job_done(taken, 5000)                  # the result comes after: nobody would give it back
    assert queue.get(0) is other


def test_a_results_size_counts_its_arrays_and_text_and_gives_up_on_huge_structures():
    import numpy as np
    from hailo_devmgr.daemon.jobs import payload_bytes
    result = ({"outputs": {"y": np.zeros(1000, np.float32)}, "text": "abc", "raw": b"xy"}, 1.5, 0.0)
    assert payload_bytes(result) == 4000 + 3 + 2
    assert payload_bytes([{"a": 1}] * 300, max_nodes=256) is None
    assert payload_bytes([[[]]] * 100, max_nodes=150) is None   # nested: too many nodes in all


class _Batchable:
    """A job's fn that may share a device call with others of its key (as actions.InferCall)."""

    def __init__(self, name, key):
        self.name, self.batch_key = name, key

    def __call__(self):
        return self.name


def batchable(name, key, client="a", priority=NORMAL, **fields) -> Job:
    return Job(fn=_Batchable(name, key), label=name, budget_s=1, priority=priority, client=client,
               owner=client, request_id=name, **fields)


def drain_batches(queue, most: int) -> list[list[str]]:
    batches = []
    while (first := queue.get(0)) is not None:
        batches.append([first.label] + [job.label for job in queue.take_along(first, most)]
                       if first.batch_key is not None else [first.label])
    return batches


@pytest.mark.parametrize("policy", [FairScheduler, FifoQueue])
def test_a_batch_is_the_jobs_of_its_key_that_would_run_next_and_no_others(policy):
    queue = policy()
    for item in (batchable("m1", "m"), batchable("m2", "m"), job("plain"), batchable("m3", "m"),
                 batchable("other", "o"), batchable("m4", "m"), batchable("m5", "m"), batchable("m6", "m")):
        queue.put(item)
    # A batch stops at the first job of another key (or none), and at its size.
    assert drain_batches(queue, most=2) == [["m1", "m2"], ["plain"], ["m3"], ["other"], ["m4", "m5", "m6"]]


def test_a_batch_keeps_the_round_robin_between_clients():
    queue = FairScheduler()
    for index in range(4):
        queue.put(batchable(f"greedy{index}", "m", client="greedy"))
    queue.put(batchable("polite0", "m", client="polite"))
    queue.put(job("polite1", client="polite"))
    # The polite client's jobs come where they would one by one: a batch of the
    # greedy client's does not jump them.
    assert drain_batches(queue, most=7) == [["greedy0", "polite0", "greedy1"], ["polite1"],
                                            ["greedy2", "greedy3"]]


def test_a_client_past_its_untaken_bytes_gets_nothing_into_a_batch():
    queue = FairScheduler(QueueLimits(max_untaken_bytes=1000))
    for item in (batchable("slow1", "m", client="slow"), batchable("fast1", "m", client="fast"),
                 batchable("slow2", "m", client="slow"), batchable("fast2", "m", client="fast")):
        queue.put(item)
    first = queue.get(0)
    queue.job_done(first, 1500)   # as if it had run: the slow client is past its bound
    assert [job.label for job in queue.take_along(first, 7)] == ["fast1", "fast2"]
    assert len(queue) == 1


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("policy", [FairScheduler, FifoQueue])
def test_batches_take_jobs_in_exactly_the_order_one_by_one_would(seed, policy):
    """Whatever the clients, classes, keys and affinity: the batches, put end
    to end, are the order ``get`` alone gives (a batch changes how jobs run,
    never which runs when), and each batch has one key."""
    import random
    rng = random.Random(seed)
    loaded = frozenset({"generic:/warm.hef"})

    keys = {}   # label -> batch key

    def fill():
        queue = policy(QueueLimits(affinity_max_skips=2), loaded_keys=lambda: loaded)
        make = random.Random(seed)
        for index in range(40):
            label, key = f"j{index}", make.choice(["a", "b", None])
            fields = dict(client=make.choice(["x", "y", "z"]), priority=make.randrange(3),
                          model_key=make.choice(["generic:/warm.hef", "generic:/cold.hef"]))
            queue.put(batchable(label, key, **fields) if key else job(label, **fields))
            keys[label] = key
        return queue

    one_by_one = drain(fill())
    batches = drain_batches(fill(), most=rng.randrange(1, 6))
    assert [label for batch in batches for label in batch] == one_by_one
    assert any(len(batch) > 1 for batch in batches)
    for batch in batches:
        if len(batch) > 1:
            assert len({keys[label] for label in batch}) == 1 and keys[batch[0]] is not None
