"""What a person sees of a Ray job: one progress display, the job's own messages and errors;
Ray's and DeepSpeed's logs go to files in the run directory instead.

* ``ray.init(log_to_driver=False)``: the workers' and actors' output (Ray Train's controller
  and placement-group cleaner warnings, ``Reporting training result N`` of every report,
  DeepSpeed, torch warnings) is no longer copied to the driver's console. It stays in Ray's
  session logs, which :class:`RayLogs` links (and at the end copies) into ``<run>/logs/ray``;
  the driver's own Ray/DeepSpeed log records and ray.init's chatter go to ``<run>/logs/driver.log``
  (errors still reach the console too).
* ``RAY_TRAIN_ENABLE_PRINT_PATCH=0``: Ray Train V2 turns a worker's ``print`` into a log
  record *and* (when ``sys.stdout`` is wrapped, as in a Ray worker) the plain print, so every
  line came twice; the workers keep plain prints.
* The training loop's progress (``hyperscale.progress.training_step``) travels from Ray
  Train's rank-0 worker to the driver through a small queue actor (:class:`DriverConsole`),
  with the rank-0 lines that start with ``[hyperscale]`` (resumed at step N, ...). The driver
  draws them: a bar on a terminal, plain lines otherwise.

A failed run still shows its error in full: Ray Train raises the workers' tracebacks from
``fit()`` in the driver, which prints them.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Iterator

from hyperscale import progress
from hyperscale.progress import PREFIX, ConsoleSink

# Python loggers whose records belong in the log files, not on the console
LOGGERS = ("ray", "DeepSpeed", "deepspeed", "torch.distributed")
CONSOLE_LEVEL = logging.ERROR


def log_dir(output_dir: str) -> Path | None:
    """``<run>/logs`` of a local run directory; None for an s3:// one (logs stay with Ray)."""
    return None if "://" in output_dir else Path(output_dir) / "logs"


def route_python_logs(path: Path | None, loggers=LOGGERS) -> None:
    """Send these loggers' records to ``path`` (every level they emit) and only errors to the
    console; their own console handlers go. Idempotent; ``path`` None: errors-only console."""
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(CONSOLE_LEVEL)
    console._hyperscale = True
    handlers: list[logging.Handler] = [console]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = logging.FileHandler(path)
        f.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d -- %(message)s"))
        f._hyperscale = True
        handlers.append(f)
    for name in loggers:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) or \
                    getattr(h, "_hyperscale", False):
                lg.removeHandler(h)
        for h in handlers:
            lg.addHandler(h)
        lg.propagate = False


@contextlib.contextmanager
def fds_to(path: Path | None) -> Iterator[None]:
    """File descriptors 1 and 2 (what C++ code and child processes write) into ``path`` for the
    block: ray.init's own chatter (auth token notes, "failed to determine local IP", ...)."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


class RayLogs:
    """Ray's session logs (raylet, GCS, every worker's and actor's stdout/stderr, Ray Train's
    structured logs) inside the run directory: ``<run>/logs/ray`` links to the live session
    directory while the job runs, and ``finish()`` replaces the link by a copy."""

    def __init__(self, run_logs: Path | None):
        self.run_logs = run_logs
        self.session_logs: Path | None = None

    @property
    def link(self) -> Path | None:
        return None if self.run_logs is None else self.run_logs / "ray"

    def start(self) -> None:
        import ray

        try:
            node = ray._private.worker._global_node  # only a driver that started Ray has one
            self.session_logs = Path(node.get_session_dir_path()) / "logs" if node is not None else None
        except Exception:
            self.session_logs = None
        if self.link is None or self.session_logs is None or not self.session_logs.is_dir():
            return
        self.run_logs.mkdir(parents=True, exist_ok=True)
        if self.link.is_symlink() or self.link.is_file():
            self.link.unlink()
        elif self.link.is_dir():  # an earlier run's copy (a resumed run): keep it beside
            n = 1
            while (self.run_logs / f"ray.{n}").exists():
                n += 1
            self.link.rename(self.run_logs / f"ray.{n}")
        self.link.symlink_to(self.session_logs, target_is_directory=True)

    def finish(self) -> None:
        """Stop Ray (its processes' last lines land in the files), then copy the session logs over
        the link (at exit: Ray's temp dir is not kept forever)."""
        link, src = self.link, self.session_logs
        if link is None or src is None or not link.is_symlink():
            return
        import ray

        with contextlib.suppress(Exception):
            ray.shutdown()
        tmp = link.with_name(".ray-copy")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, symlinks=True, ignore_dangling_symlinks=True,
                            ignore=shutil.ignore_patterns("*.sock", "sockets"))
            link.unlink()
            tmp.rename(link)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # the link stays: the logs are still in Ray's temp dir


_ray_logs: RayLogs | None = None


def start_ray_logging(output_dir: str | None, local: bool = True) -> RayLogs | None:
    """After ``ray.init`` in this driver: Python loggers into ``<run>/logs/driver.log``, Ray's
    session logs linked into ``<run>/logs/ray`` (copied at exit) when this driver started that
    Ray (``local``; a cluster's session logs hold every job's and stay on its nodes), and one
    line on the console that says where."""
    global _ray_logs
    import atexit

    run_logs = log_dir(output_dir) if output_dir else None
    route_python_logs(run_logs / "driver.log" if run_logs else None)
    logs = RayLogs(run_logs)
    if local:
        logs.start()
    if _ray_logs is None:
        atexit.register(lambda: _ray_logs is not None and _ray_logs.finish())
    _ray_logs = logs
    if run_logs is not None and logs.session_logs is not None:
        where = f"{run_logs} (driver.log; ray/: every Ray worker and actor)"
    elif run_logs is not None:
        where = f"{run_logs}/driver.log; the workers' logs are on the Ray cluster's nodes (dashboard, `ray logs`)"
    elif logs.session_logs is not None:
        where = str(logs.session_logs)
    else:
        where = "on the Ray cluster's nodes (dashboard, `ray logs`)"
    print(f"{PREFIX} logs: {where}", flush=True)
    return logs


def finish_ray_logging() -> None:
    if _ray_logs is not None:
        _ray_logs.finish()


@contextlib.contextmanager
def interruptible(resume_hint=None) -> Iterator[None]:
    """Around a job's main work: Ctrl+C (SIGINT) ends it with one readable line and exit code
    130 instead of a traceback; ``resume_hint`` (a string, or a function asked then) says how to
    continue. A training run that a signal stopped (``preemption.Interrupted``: SIGTERM or
    SIGINT during training) ends with one line saying whether it checkpointed (at which step,
    where, how long after the signal) and how to continue, and exit code 143 (SIGTERM) or 130."""
    from hyperscale.train.preemption import Interrupted

    def tail() -> str:
        hint = resume_hint
        if callable(hint):
            try:
                hint = hint()
            except Exception:
                hint = None
        return f"; {hint}" if hint else ""

    try:
        yield
    except Interrupted as e:
        sys.stdout.flush()
        if e.step is not None:
            what = f"stopped at step {e.step} with a checkpoint ({e.checkpoint}), {e.seconds:.1f} s after the signal"
        elif e.forced:
            what = "a second signal: stopped without waiting for the checkpoint"
        else:
            what = f"no checkpoint within train.preemption_grace_seconds={e.grace_s:g} s"
        print(f"\n{PREFIX} {e.reason}: {what}{tail()}", file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f"\n{PREFIX} interrupted (Ctrl+C){tail()}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def training_resume_hint(cfg, argv: list[str] | None = None):
    """For ``interruptible``: where the interrupted run's latest checkpoint stands, and the
    command that continues from it (``latest``: a fresh start while there is none)."""
    def hint() -> str:
        from hyperscale.storage.local import join
        from hyperscale.train.checkpoint import find_latest, meta_step
        from hyperscale.train.launch import resolve_paths

        latest = find_latest(join(resolve_paths(cfg).run.output_dir, "checkpoints"))
        if latest is None:
            return (f"no checkpoint yet (one every {cfg.train.checkpoint_every} steps); "
                    f"start again with: {resume_command(argv)}")
        return (f"continue from its checkpoint at step {meta_step(latest)} with: "
                f"{resume_command(argv, own_checkpoint=True)}")
    return hint


def resume_command(argv: list[str] | None = None, key: str = "train.resume_from_checkpoint=latest",
                   own_checkpoint: bool = False) -> str:
    """The command line that continues an interrupted training job: the same, resuming. With
    ``own_checkpoint`` (the run wrote one), from that: a ``train.resume_from_checkpoint`` the job
    started from (another run's checkpoint) is replaced by ``key``, else the rerun would go back to it."""
    import shlex

    argv = list(sys.argv if argv is None else argv)
    given = [a for a in argv if a.startswith("train.resume_from_checkpoint=")]
    if own_checkpoint:
        argv = [a for a in argv if a not in given] + [key]
    elif not given:
        argv.append(key)
    return "python " + shlex.join(argv)


# ---------------------------------------------------------------- worker -> driver progress

class _QueueSink:
    """In Ray Train's rank-0 worker: each step to the driver's queue, and as a plain line into
    this worker's own log."""

    def __init__(self, queue, stream):
        self.queue, self.stream, self.local = queue, stream, None

    def _put(self, item) -> None:
        try:
            self.queue.put_nowait(item)
        except Exception:  # the display must never stop training (driver gone, queue full)
            pass

    def step(self, event: dict) -> None:
        self._put(("step", event))
        if self.local is None:
            self.local = progress.Progress(event["total"], "train", "steps", stream=self.stream, tty=False,
                                           min_interval=0.0)
        self.local.set(event["step"], event["fields"], eta=event.get("eta"))

    def message(self, text: str) -> None:
        self._put(("message", text))


class _LineTee(io.TextIOBase):
    """A ``sys.stdout`` that hands complete lines to ``sink.message``: every line, or (``only``)
    those that start with it; ``stream``: where everything is also written (None: nowhere)."""

    def __init__(self, stream, sink, only: str | None = None, fileno_of=None):
        self.stream, self.sink, self.only, self.buf = stream, sink, only, ""
        self._fileno_of = fileno_of or stream

    def write(self, s: str) -> int:
        if self.stream is not None:
            self.stream.write(s)
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if self.only is None or line.startswith(self.only):
                self.sink.message(line)
        return len(s)

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fileno_of.fileno()


@contextlib.contextmanager
def worker_console(queue) -> Iterator[None]:
    """Around the training loop in a Ray Train worker: rank 0 sends its progress and messages
    to the driver's :class:`DriverConsole` (``queue``; None: the worker keeps them), and any
    rank that fails sends its full traceback (Ray shortens the one it raises in the driver)."""
    import traceback

    import ray.train

    if queue is None:
        yield
        return
    rank = ray.train.get_context().get_world_rank()
    stdout = sys.stdout
    sink = _QueueSink(queue, stdout)
    if rank == 0:
        progress.set_sink(sink)
        sys.stdout = _LineTee(stdout, sink, only=PREFIX)
    try:
        yield
    except BaseException:
        sink._put(("error", {"rank": rank, "traceback": traceback.format_exc()}))
        raise
    finally:
        if rank == 0:
            sys.stdout = stdout
            progress.set_sink(None)


@contextlib.contextmanager
def local_console(desc: str, logs: Path | None) -> Iterator[None]:
    """Training in this process (``--no-ray``): DeepSpeed's and torch.distributed's log records
    into ``logs/driver.log`` (errors still on the console), the loop's progress drawn here; on
    a terminal, the lines the loop prints go above the bar."""
    with fds_to(logs / "driver.log" if logs else None):
        with contextlib.suppress(ImportError):
            import deepspeed  # noqa: F401  (its import adds a console handler and says which accelerator)
    route_python_logs(logs / "driver.log" if logs else None)
    if logs is not None:
        print(f"{PREFIX} logs: {logs}/driver.log", flush=True)
    stdout = sys.stdout
    sink = ConsoleSink(desc, stream=stdout)
    progress.set_sink(sink)
    if progress.is_tty(stdout):
        sys.stdout = _LineTee(None, sink, fileno_of=stdout)
    try:
        yield
    finally:
        sys.stdout = stdout
        sink.close()
        progress.set_sink(None)


class DriverConsole:
    """The driver's end: a queue actor the rank-0 worker writes to, and a thread that draws
    what arrives (``hyperscale.progress``). ``with DriverConsole(desc) as c: ... c.queue``."""

    def __init__(self, desc: str, poll_s: float = 0.5):
        from ray.util.queue import Queue

        from hyperscale.train.preemption import on_driver_node

        self.queue = Queue(actor_options=on_driver_node())
        self.sink = ConsoleSink(desc)
        self.poll_s = poll_s
        self.errors: dict[int, str] = {}  # rank -> the full traceback of its failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hyperscale-console", daemon=True)

    def _handle(self, item) -> None:
        kind, payload = item
        if kind == "step":
            self.sink.step(payload)
        elif kind == "error":
            self.errors.setdefault(payload["rank"], payload["traceback"])
        else:
            self.sink.message(payload)

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self._handle(self.queue.get(timeout=self.poll_s))
            except Empty:
                self.sink.tick()  # a terminal's bar: elapsed and ETA move on
                continue
            except Exception:  # the queue actor is gone (Ray shutting down): stop drawing
                return

    def _drain(self) -> None:
        try:
            items = self.queue.get_nowait_batch(self.queue.qsize())
        except Exception:
            return
        for item in items:
            self._handle(item)

    def print_errors(self, stream=None) -> None:
        """Each distinct worker traceback once, in full, with the ranks that raised it."""
        stream = stream or sys.stderr
        by_text: dict[str, list[int]] = {}
        for rank, text in sorted(self.errors.items()):
            by_text.setdefault(text, []).append(rank)
        for text, ranks in by_text.items():
            who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
            stream.write(f"{PREFIX} training failed on {who}:\n{text.rstrip()}\n")
        stream.flush()

    def __enter__(self) -> "DriverConsole":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        self.sink.close()
        if exc and exc[0] is not None and self.errors:
            self.print_errors()
        with contextlib.suppress(Exception):
            self.queue.shutdown(force=True)
