"""Thread placement and the load check that batch-1 generation relies on."""

import os
import threading

import pytest

import charlm.runtime as runtime

needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")


@needs_affinity
def test_pinned_to_cpu_holds_only_the_calling_thread_and_only_inside():
    before = os.sched_getaffinity(0)
    cpu = runtime.one_cpu_each(1)[0]
    pinned, looked = threading.Event(), []

    def look_while_pinned():  # a thread that exists already keeps its own CPUs
        pinned.wait()
        looked.append(os.sched_getaffinity(0))

    other = threading.Thread(target=look_while_pinned)
    other.start()
    with runtime.pinned_to_cpu(cpu):
        assert os.sched_getaffinity(0) == {cpu}
        pinned.set()
        other.join()
    assert os.sched_getaffinity(0) == before
    assert looked == [before]
    with pytest.raises(KeyError), runtime.pinned_to_cpu(cpu):
        raise KeyError("restored on the way out of an error too")
    assert os.sched_getaffinity(0) == before
    with runtime.pinned_to_cpu(None):
        assert os.sched_getaffinity(0) == before


@needs_affinity
def test_one_cpu_each_gives_distinct_allowed_cpus_while_there_are_enough():
    allowed = os.sched_getaffinity(0)
    cpus = runtime.one_cpu_each(len(allowed))
    assert set(cpus) == allowed
    assert set(runtime.one_cpu_each(len(allowed) + 2)) <= allowed


@pytest.mark.parametrize("looks, busy", [([0], False), ([5, 0], False), ([5, 5], True)])
def test_others_keep_cores_busy_only_when_a_second_look_agrees(monkeypatch, looks, busy):
    readings = iter(looks)
    monkeypatch.setattr(runtime, "_others_running", lambda: next(readings))
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    runtime.limit_threads(2)
    assert runtime.others_keep_cores_busy() is busy
    assert next(readings, None) is None  # every look was taken, and no more
