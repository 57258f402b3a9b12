"""
How many CPU threads train.py's steps run on, followed through the run rather than chosen once.

A step split over N threads waits for the slowest of them: when another process takes one of the
cores, the thread left to share it holds up the others, and a step often takes ten times as long as
on one thread alone (docs/results.md, "CPU threads that follow the machine"). The load average
trails the machine by a minute; the step times say it at once. So Tuner watches them:

- when the median of the last `window` steps is `slowdown` times the fastest such median at this
  count, it tries half the threads for `window` steps, and keeps whichever count had the faster
  median (a try ends at its first step that is `slowdown` times slower, which is then enough);
- it does so once after the first `window` steps too, since a process that held a core before the
  run began slows down no step of it, and the load average may not show it yet;
- after `retry` seconds of steps on fewer threads than at the start, it tries more again, halfway
  back; each such try that fails doubles the wait, up to LONGEST_RETRY.

One step slow for a reason of its own (the first, which warms up allocators and caches, or the first
after an evaluation) moves no median. Tuner sees only the durations it is given, so a test can drive
it with any sequence; start() sets it up for a run, where --threads N keeps N, and so do DDP, CUDA
and MPS, where the threads only feed the devices.
"""

import collections
import os
import statistics

import torch

LONGEST_RETRY = 300.0  # seconds; a neighbour that stays is probed every five minutes at most


def duration(seconds):
    if seconds >= 1:
        return f"{seconds:.1f} s"
    return f"{seconds * 1e3:.{1 if seconds < 0.01 else 0}f} ms"


def in_words(n):
    return f"{n} CPU thread{'s' if n != 1 else ''}"


class Tuner:
    """The thread count for the next step, from the durations of the steps so far: step(seconds)
    returns a line for the log when the count changes, else None, and apply(count) sets a new count.
    Counts lie in [fewest, most]; with fewest == most the count is fixed."""

    def __init__(self, threads, fewest, most, apply, window=3, slowdown=3.0, retry=20.0):
        self.threads, self.fewest, self.most, self.apply = threads, fewest, most, apply
        self.slowdown = slowdown
        self.first_retry = self.retry = retry
        self.recent = collections.deque(maxlen=window)  # the last durations since the count last changed
        self.usual = None  # the fastest median of `window` steps at this count, what it gives on quiet cores
        self.waited = 0.0  # seconds of steps since the count last changed
        self.trying = None  # during a try: the count before it, its median then, its usual step, whether more threads

    def step(self, seconds):
        if self.fewest == self.most:
            return None
        self.recent.append(seconds)
        self.waited += seconds
        if self.trying is not None and seconds > self.slowdown * self.trying[1]:
            return self._decide(seconds)  # one step of a try this slow is enough to judge it
        if len(self.recent) < self.recent.maxlen:
            return None
        now = statistics.median(self.recent)
        if self.trying is not None:
            return self._decide(now)
        first = self.usual is None  # only at the start: every later count comes with its usual step
        self.usual = now if first else min(self.usual, now)
        if self.threads > self.fewest and (first or now > self.slowdown * self.usual):
            fewer = max(self.fewest, self.threads // 2)
            why = f"{duration(now)} a step on {in_words(self.threads)}" if first else \
                f"steps slowed from {duration(self.usual)} to {duration(now)}"
            return self._try(fewer, now, f"{why}; trying {in_words(fewer)}")
        if self.threads < self.most and self.waited >= self.retry:
            more = self.threads + (self.most - self.threads + 1) // 2
            return self._try(more, now, f"{duration(now)} a step on {in_words(self.threads)} for the last "
                                        f"{self.waited:.0f} s; trying {in_words(more)}")
        return None

    def _try(self, threads, now, line):
        self.trying = (self.threads, now, self.usual, threads > self.threads)
        self._set(threads, usual=None)
        return line

    def _decide(self, now):
        """The end of a try: keep its count if its steps were faster, else go back to the count before."""
        before, then, usual, more = self.trying
        tried, self.trying = self.threads, None
        if now < then:
            self._set(tried, usual=now)
            if more:
                self.retry = self.first_retry  # the neighbour has gone
            return f"keeping {in_words(tried)}: {duration(now)} a step against {duration(then)} with {before}"
        if more:
            self._set(before, usual=usual)
            self.retry = min(2 * self.retry, LONGEST_RETRY)
            return (f"back to {in_words(before)}: {duration(now)} a step with {tried} against {duration(then)}; "
                    f"next try in {self.retry:.0f} s")
        # Fewer threads were slower still: the machine itself is slower, so the slow steps are this
        # count's usual ones now, and only a further slowdown starts another try.
        self._set(before, usual=then)
        return f"back to {in_words(before)}: {duration(now)} a step with {tried} against {duration(then)}"

    def _set(self, threads, usual):
        if threads != self.threads:
            self.apply(threads)
        self.threads, self.usual, self.waited = threads, usual, 0.0
        self.recent.clear()


def start(requested, adaptive):
    """The run's Tuner, with torch set to its first count: --threads N (requested) fixes N; else, where
    adaptive (one process on the CPU), one thread when the load average already shows every core busy,
    torch's default otherwise, followed from there; elsewhere torch's default, fixed."""
    most = torch.get_num_threads()
    if requested or not adaptive:
        threads = fewest = most = requested or most
    else:
        threads, fewest = 1 if os.getloadavg()[0] >= (os.cpu_count() or 1) else most, 1
    torch.set_num_threads(threads)
    return Tuner(threads, fewest, most, torch.set_num_threads)
