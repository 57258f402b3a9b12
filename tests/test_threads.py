"""threads.py's choice of CPU threads, driven by given step times (no real load, so nothing flaky), and
its place in train.py."""

import time

import pytest
import torch

from llm_machinery import threads
import train

from test_train import TINY


def drive(tuner, durations):
    """Feed durations to tuner: [(index of the step, count after it, log line)] for each change."""
    return [(i, tuner.threads, line) for i, seconds in enumerate(durations) if (line := tuner.step(seconds))]


def tuner(threads_=2, fewest=1, most=2, step=0.04, **kwargs):
    """A Tuner past the start of a run on quiet cores (where it could try fewer threads, the try is
    over: they were slower), with `step` seconds a step, and the list of counts it applies from then on."""
    applied = []
    t = threads.Tuner(threads_, fewest, most, applied.append, **kwargs)
    if threads_ > fewest:
        assert len(drive(t, [step] * 3 + [1.3 * step] * 3)) == 2 and t.threads == threads_
        applied.clear()
    return t, applied


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_first_steps_try_fewer_threads_once():
    applied = []
    t = threads.Tuner(2, 1, 2, applied.append)
    # A slow first step (allocators and caches warm up) moves no median.
    assert drive(t, [2.0, 0.04, 0.04] + [0.052] * 3 + [0.040, 0.046, 0.038, 0.052, 0.041] * 40) == [
        (2, 1, "40 ms a step on 2 CPU threads; trying 1 CPU thread"),
        (5, 2, "back to 2 CPU threads: 52 ms a step with 1 against 40 ms"),
    ]
    assert applied == [1, 2]
    # A process that held a core before the run began: the first steps are already slow.
    t = threads.Tuner(2, 1, 2, applied.append)
    assert [line for _, _, line in drive(t, [0.4] * 3 + [0.045] * 100)] == [
        "400 ms a step on 2 CPU threads; trying 1 CPU thread", "keeping 1 CPU thread: 45 ms a step against 400 ms with 2"]
    assert t.threads == 1


def test_steady_steps_keep_the_count():
    t, applied = tuner()
    # Noise and lone slow steps (an evaluation before them, a page fault) are no slowdown.
    steady = [0.040, 0.046, 0.038, 0.052, 0.041] * 40 + [0.4, 0.04, 0.04, 0.5, 0.04, 0.04]
    assert drive(t, steady) == [] and applied == [] and t.threads == 2


def test_a_slowdown_tries_fewer_threads_and_keeps_them_when_faster():
    t, applied = tuner()
    changes = drive(t, [0.04] * 6 + [0.4, 0.4] + [0.045] * 3 + [0.045] * 100)
    assert changes == [
        (7, 1, "steps slowed from 40 ms to 400 ms; trying 1 CPU thread"),
        (10, 1, "keeping 1 CPU thread: 45 ms a step against 400 ms with 2"),
    ]
    assert applied == [1]


def test_fewer_threads_that_are_slower_go_back():
    t, applied = tuner()
    changes = drive(t, [0.04] * 6 + [0.4, 0.4] + [0.8] * 3 + [0.4] * 100)
    assert changes == [
        (7, 1, "steps slowed from 40 ms to 400 ms; trying 1 CPU thread"),
        (10, 2, "back to 2 CPU threads: 800 ms a step with 1 against 400 ms"),
    ]
    # The machine is slower whatever the count: the slow steps are the usual ones now, and no try follows.
    assert applied == [1, 2] and t.threads == 2


def steps_until_change(t, seconds):
    """How many steps of `seconds` t takes before it changes its count (the one that changes it included)."""
    for n in range(1, 100_000):
        if t.step(seconds) is not None:
            return n
    raise AssertionError("the count never changed")


def test_more_threads_are_tried_again_once_the_neighbour_is_gone():
    t, applied = tuner(retry=20.0)
    drive(t, [0.04] * 6 + [0.4, 0.4] + [0.125] * 3)  # kept 1 thread
    assert steps_until_change(t, 0.125) == 160  # 20 s of steps (binary fractions: the sum is exact)
    assert t.threads == 2 and applied == [1, 2]
    (_, _, line), = drive(t, [0.04] * 3)
    assert line == "keeping 2 CPU threads: 40 ms a step against 125 ms with 1"
    assert t.threads == 2 and applied == [1, 2]
    assert drive(t, [0.04] * 10_000) == []  # as many threads as at the start: nothing more to try


def test_a_failed_try_of_more_threads_waits_twice_as_long_before_the_next():
    t, _ = tuner(retry=10.0)
    drive(t, [0.04] * 6 + [0.4, 0.4] + [0.125] * 3)  # kept 1 thread
    waits = []
    for _ in range(7):
        waits.append(steps_until_change(t, 0.125) * 0.125)
        assert t.threads == 2
        (_, threads_, line), = drive(t, [0.5])  # 2 threads are slower: the neighbour is still there
        assert threads_ == 1
        assert line == f"back to 1 CPU thread: 500 ms a step with 2 against 125 ms; next try in {t.retry:.0f} s"
    assert waits == [10, 20, 40, 80, 160, 300, 300]
    # A try that succeeds starts the waits over.
    steps_until_change(t, 0.125)
    drive(t, [0.04] * 3)
    assert t.threads == 2 and t.retry == 10.0


def test_a_try_ends_at_its_first_much_slower_step():
    t, applied = tuner(retry=1.0)
    drive(t, [0.04] * 6 + [0.4, 0.4] + [0.1] * 3)  # kept 1 thread
    steps_until_change(t, 0.1)
    assert t.threads == 2
    assert drive(t, [0.29, 0.28]) == []  # 2 threads, each step below 3 times the 100 ms of 1 thread
    assert drive(t, [0.5]) == [(0, 1, "back to 1 CPU thread: 500 ms a step with 2 against 100 ms; next try in 2 s")]
    assert applied == [1, 2, 1]


def test_many_cores_halve_then_come_back_halfway():
    t, applied = tuner(16, 1, 16, step=0.01, retry=5.0)
    drive(t, [0.01] * 5 + [0.1] * 2 + [0.012] * 3)
    assert applied == [8] and t.threads == 8
    changes = drive(t, [0.012] * 1000)
    assert changes[0][1] == 12 and "trying 12 CPU threads" in changes[0][2]


def test_a_fixed_count_never_changes():
    for t, applied in (tuner(4, 4, 4), tuner(1, 1, 1)):
        assert drive(t, [0.04] * 6 + [0.4] * 10 + [0.04] * 1000 + [5.0] * 10) == [] and applied == []


def test_one_thread_of_many_cannot_go_lower_but_tries_more_later():
    t, applied = tuner(1, 1, 4, retry=5.0)
    assert drive(t, [0.0625] * 6 + [0.5] * 3) == [] and applied == []  # 1.9 s of steps, 8 times slower
    assert steps_until_change(t, 0.5) == 7 and t.threads == 3 and applied == [3]  # at 5.4 s


def test_start(restore_threads, monkeypatch):
    default = 4  # torch's count when the run starts, whatever OMP_NUM_THREADS the tests run with
    torch.set_num_threads(default)
    t = threads.start(3, adaptive=True)  # --threads 3
    assert torch.get_num_threads() == 3 and (t.threads, t.fewest, t.most) == (3, 3, 3)
    torch.set_num_threads(default)
    t = threads.start(0, adaptive=False)  # DDP, CUDA, MPS
    assert torch.get_num_threads() == default and (t.threads, t.fewest, t.most) == (default, default, default)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    t = threads.start(0, adaptive=True)  # every core busy already
    assert torch.get_num_threads() == 1 and (t.threads, t.fewest, t.most) == (1, 1, default)
    torch.set_num_threads(default)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    t = threads.start(0, adaptive=True)
    assert torch.get_num_threads() == default and (t.threads, t.fewest, t.most) == (default, 1, default)
    t.step(0.01)
    t.apply(1)  # what the tuner calls on a change: torch's count
    assert torch.get_num_threads() == 1


def test_train_times_each_step_and_logs_a_change(corpus_env, restore_threads, monkeypatch, capsys):
    """train.py gives the tuner the duration of each training step, without the evaluations between
    them (each one moves train.py's clock on by 1000 s here), and prints the tuner's line when the count changes, not its tries."""
    fed, later = [], [0.0]

    class Recorder(threads.Tuner):
        def step(self, seconds):
            fed.append(seconds)
            if len(fed) == 2:  # a try of one thread, which goes back to two: nothing to say
                self.apply(1)
                self.trying = (2, seconds, seconds, False)
                return "TRY-LINE"
            if len(fed) == 3:
                self.apply(2)
                self.trying = None
                return "BACK-LINE"
            if len(fed) == 4:
                self.apply(1)
                return "a line from the tuner"

    def start(requested, adaptive):
        assert (requested, adaptive) == (0, True)
        return Recorder(2, 1, 2, torch.set_num_threads)

    class Clock:
        def __getattr__(self, name):
            return getattr(time, name)

        def perf_counter(self):
            return time.perf_counter() + later[0]

    evaluate = train.Run.evaluate

    def evaluate_for_1000_s(run, *args, **kwargs):
        later[0] += 1000
        return evaluate(run, *args, **kwargs)

    monkeypatch.setattr(threads, "start", start)
    monkeypatch.setattr(train, "time", Clock())
    monkeypatch.setattr(train.Run, "evaluate", evaluate_for_1000_s)
    assert TINY[-2:] == ["--threads", "1"]  # left out: the count is the tuner's
    argv = ["--data", str(corpus_env / "corpus.txt"), "--out", str(corpus_env / "threads"), *TINY[:-2],
            "--max-steps", "6", "--eval-every", "2"]
    assert train.main(argv) == 0
    assert later[0] >= 2000 and len(fed) == 6 and all(0 < s < 60 for s in fed), fed
    out = capsys.readouterr().out
    assert "threads: a line from the tuner" in out and "TRY-LINE" not in out and "BACK-LINE" not in out
