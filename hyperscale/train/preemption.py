"""Preemption-safe runs: a stop signal ends a job with a checkpoint, within a bounded grace period.

Driver (``run_training``, ``run_in_process``): :class:`SignalStop` takes SIGTERM and SIGINT in
the main thread while the run trains. The first one records itself and asks the workers to
stop (Ray: a ``num_cpus=0`` :class:`StopFlag` actor; without Ray: a flag the in-process loop
reads), says so on the console, and starts the clock of ``train.preemption_grace_seconds``.
The workers check at every step boundary (:class:`StopPoller`, a non-blocking look at the
actor), agree on it across ranks (one all-reduce of a small integer per step, so every rank
stops at the same step), write a checkpoint through the ordinary atomic path, report it and
return without exporting. The driver then raises :class:`Interrupted`, which the job scripts
turn into one line naming the checkpoint and the exact resume command, and exit code 143
(SIGTERM) or 130 (SIGINT). If the checkpoint has not landed when the grace period ends, or a
second signal comes, the driver exits anyway (same code; the line names the newest complete
checkpoint, if any), and a watchdog makes that exit hard if Ray's shutdown does not return.

Node preemption through Ray: a node that is drained (KubeRay, the autoscaler, spot
interruption handling; Ray Train 2.60's ``PreemptionWatcher``) marks the workers; the loop
sees that mark at the next step boundary, checkpoints the same way and then raises
:class:`NodePreempted`, so Ray Train restarts the worker group from that checkpoint
(``FailureConfig.max_preemption_failures``, unlimited by default) instead of taking the early
return for a finished run. (The Ray side is read from Ray 2.60's code; the loop's part is tested
in process with a session that reports the mark, not on a real drain.) A SIGTERM sent straight to a Ray worker process is Ray's own
business: Ray's worker turns it into an immediate exit (a handler cannot be set from Ray
Train's training thread), and Ray Train restarts the group from the newest checkpoint when
``train.max_failures`` allows; ``train.checkpoint_every_minutes`` bounds what that loses.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)
DRAIN = "node-preemption"  # the reason when Ray drains a node of this run
# reasons travel between ranks as integers (an all-reduce takes the largest: any rank's reason wins)
_CODES = {None: 0, "SIGINT": int(signal.SIGINT), "SIGTERM": int(signal.SIGTERM), DRAIN: 1000}
_REASONS = {v: k for k, v in _CODES.items()}


def exit_code(reason: str) -> int:
    """The exit code of a job stopped by ``reason``: 128 + the signal's number (130, 143), as a
    shell reports a process ended by that signal."""
    return 128 + int(getattr(signal, reason, signal.SIGTERM))


class Interrupted(Exception):
    """A run ended early by a stop signal (``reason``: ``"SIGTERM"`` or ``"SIGINT"``).
    ``step``: the step of the checkpoint written for it (None: none was written in time);
    ``checkpoint``: where it is; ``seconds``: from the signal to the end of training;
    ``metrics``: the last ones reported; ``forced``: a second signal cut the wait short."""

    def __init__(self, reason: str, step: int | None, seconds: float, grace_s: float,
                 metrics: dict | None = None, forced: bool = False, checkpoint: str | None = None):
        self.reason, self.step, self.seconds, self.grace_s = reason, step, seconds, grace_s
        self.metrics, self.forced, self.checkpoint = metrics or {}, forced, checkpoint
        super().__init__(f"{reason}: " + (f"checkpoint at step {step}" if step is not None else "no checkpoint"))

    @property
    def exit_code(self) -> int:
        return exit_code(self.reason)


class NodePreempted(RuntimeError):
    """Raised by every rank after the checkpoint taken for a drained node: Ray Train restarts
    the worker group from it (a normal return would end the run as finished)."""


class SignalStop:
    """In the main thread, around training: SIGTERM and SIGINT stop the run gracefully.

    The first signal sets ``reason`` and ``at`` (monotonic seconds), calls ``on_first(reason)``
    and prints one line; a second one raises :class:`Interrupted` (``forced``) at once. The
    previous handlers come back on exit. ``grace_s``: how long the caller waits for the
    checkpoint; without Ray (``hard_exit_after_grace``, the loop runs in this very thread) a
    timer ends the process once it has passed."""

    def __init__(self, grace_s: float, on_first: Callable[[str], None] | None = None,
                 hard_exit_after_grace: bool = False):
        self.grace_s, self.on_first, self.hard = grace_s, on_first, hard_exit_after_grace
        self.reason: str | None = None
        self.at: float | None = None
        self._saved: dict = {}
        self._timer: threading.Timer | None = None

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None:
            raise Interrupted(self.reason, None, time.monotonic() - self.at, self.grace_s, forced=True)
        self.reason, self.at = name, time.monotonic()
        print(f"\n[hyperscale] {name}: checkpointing at the next step, then stopping "
              f"(at most {self.grace_s:g} s: train.preemption_grace_seconds; a second signal stops at once)",
              file=sys.stderr, flush=True)
        if self.on_first is not None:
            try:
                self.on_first(name)
            except Exception as e:  # the workers cannot be told: the grace period still bounds the exit
                print(f"[hyperscale] could not ask the workers to stop: {e}", file=sys.stderr, flush=True)
        if self.hard:
            self._timer = hard_exit_timer(self.grace_s, exit_code(name),
                                          f"{name}: no checkpoint within train.preemption_grace_seconds="
                                          f"{self.grace_s:g} s; exiting")

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() - self.at > self.grace_s

    def __enter__(self) -> "SignalStop":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._saved[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for s, h in self._saved.items():
            signal.signal(s, h)


def hard_exit_timer(seconds: float, code: int, message: str) -> threading.Timer:
    """A daemon timer that ends this process with ``code`` after ``seconds`` (a bounded exit
    when what should end it hangs)."""
    def fire() -> None:
        print(f"\n[hyperscale] {message}", file=sys.stderr, flush=True)
        os._exit(code)
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def run_until_stopped(fn: Callable[[], object], stop: SignalStop, poll_s: float = 0.2):
    """``fn()`` (``trainer.fit``) in a helper thread while this (main) thread takes the signals;
    returns its result, or raises what it raised. Raises :class:`Interrupted` (no checkpoint)
    once ``stop``'s grace period has passed and ``fn`` still runs. In a helper thread, Ray
    Train's ``fit`` installs no SIGINT handler of its own (it would abort the run at once)."""
    out: dict = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # handed to the main thread
            out["error"] = e

    worker = threading.Thread(target=target, name="hyperscale-fit", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(poll_s)
        if worker.is_alive() and stop.expired():
            raise Interrupted(stop.reason, None, time.monotonic() - stop.at, stop.grace_s)
    if "error" in out:
        raise out["error"]
    return out["result"]


# ---------------------------------------------------------------- Ray: driver -> workers

def on_driver_node() -> dict:
    """Actor options that place an actor on the driver's own node (a hard affinity): the driver's
    helpers (the stop flag, the console queue) then live and die with the driver, never with a
    worker node that is preempted mid-run (docs/benchmarks.md §10)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        node_id=ray.get_runtime_context().get_node_id(), soft=False)}


def stop_flag():
    """A new :class:`StopFlag` actor on the driver's node (Ray must be running)."""
    import ray

    @ray.remote(num_cpus=0)
    class StopFlag:
        """Set once by the driver, read by every worker at its step boundaries."""

        def __init__(self):
            self.reason = None

        def set(self, reason: str) -> None:
            if self.reason is None:
                self.reason = reason

        def get(self):
            return self.reason

    return StopFlag.options(**on_driver_node()).remote()


class StopPoller:
    """In a Ray Train worker: whether the driver asked to stop (``flag``, a StopFlag actor; None:
    nobody can) or Ray is draining this run's node. ``poll`` never blocks: it looks whether the
    flag's last answer has arrived and asks again."""

    def __init__(self, flag=None, watch_drain: bool = True):
        self.flag, self.watch_drain = flag, watch_drain
        self.pending, self.reason = None, None

    def poll(self) -> str | None:
        if self.reason is None and self.flag is not None:
            import ray

            if self.pending is None:
                self.pending = self.flag.get.remote()
            ready, _ = ray.wait([self.pending], timeout=0)
            if ready:
                try:
                    self.reason = ray.get(self.pending)
                except Exception:  # the flag is gone with its driver: nobody to stop for
                    self.flag = None
                self.pending = None
        if self.reason is None and self.watch_drain and _node_drained():
            self.reason = DRAIN
        return self.reason


def _node_drained() -> bool:
    """Ray Train's mark that a node of this worker group is being drained (preempted), read
    locally (``ray.train.get_preemption_info`` is a collective through Ray, too costly for every
    step; the loop agrees across ranks itself)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info is not None
    except Exception:  # another Ray version, or not in a Ray Train worker
        return False


def agree(reason: str | None, device=None) -> str | None:
    """Collective: the stop reason of any rank (SIGTERM over SIGINT, a drain over both), the
    same on every rank; None while nobody stops. One small all-reduce."""
    import torch
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return reason
    code = torch.tensor([_CODES[reason]], dtype=torch.int64, device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return _REASONS[int(code.item())]
