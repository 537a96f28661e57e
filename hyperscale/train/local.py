"""Training without Ray.

``run_local``: a function on N local processes joined in a gloo process group, for tests and
measurements of the engines (memory per rank, the NaN guard): the same process group Ray
Train would make (``MASTER_ADDR`` / ``MASTER_PORT`` / ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK``), at a fraction of the start-up cost. Processes are forked (``fn`` may be any
callable, even a test's local one); results come back pickled.

``LocalSession``: the training loop's session in this very process (one worker), for
``jobs/distill.py --no-ray`` on a single GPU or under a debugger.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import shutil
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from queue import Empty
from typing import Any, Callable, Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, args: tuple, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        dist.barrier()  # before exit: DeepSpeed can abort at exit otherwise (docs/stack.md §2)
        queue.put((rank, True, pickle.dumps(out)))  # plain pickle: tensors by value, not shared fds
    except BaseException:  # report, then exit non-zero
        queue.put((rank, False, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn: Callable[..., Any], world: int = 2, *args: Any, timeout: float = 600) -> list:
    """``fn(rank, world, *args)`` on ``world`` forked processes; their results in rank order.
    Raises with the first failing rank's traceback (or the exit code of one that died).
    Children run torch on one thread: an OpenMP pool inherited through fork hangs otherwise."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    error = None
    deadline = time.monotonic() + timeout
    while len(results) < world and error is None:
        try:
            rank, ok, out = queue.get(timeout=1.0)
        except Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
            if dead:
                error = f"rank {dead[0][0]} exited with code {dead[0][1]} before reporting"
            elif time.monotonic() > deadline:
                error = f"timed out after {timeout:.0f} s"
            continue
        if ok:
            results[rank] = pickle.loads(out)
        else:
            error = f"rank {rank}:\n{out}"
    for p in procs:
        p.join(timeout=5 if error else 60)
        if p.is_alive():
            p.kill()  # only the processes this call started
            p.join()
    if error:
        raise RuntimeError("a local worker failed: " + error)
    return [results[r] for r in range(world)]


class LocalSession:
    """The loop's session in this process, rank 0 of 1, without Ray. A reported checkpoint is
    copied to ``root/<its name>`` (``step_<n>``) beside, then renamed into place, so only
    complete ones appear; the newest ``keep`` stay. A restart is a new invocation, which
    resumes through ``train.resume_from_checkpoint`` (``latest`` finds them). ``stop``: the
    SignalStop of this process; the loop checkpoints and stops once it has seen a signal."""
    rank, world = 0, 1

    def __init__(self, root: Path, keep: int, stop=None) -> None:
        self.root, self.keep, self.stop = Path(root), keep, stop  # stop: a preemption.SignalStop

    def step_done(self, step: int) -> None:
        pass

    def stop_requested(self) -> str | None:
        return None if self.stop is None else self.stop.reason

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield None

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        if checkpoint_dir is None:  # metrics: the loop prints them and returns the last
            return
        from hyperscale.train.checkpoint import step_of

        self.root.mkdir(parents=True, exist_ok=True)
        final, aside = self.root / checkpoint_dir.name, self.root / f".tmp-{checkpoint_dir.name}"
        shutil.rmtree(aside, ignore_errors=True)
        shutil.copytree(checkpoint_dir, aside)
        shutil.rmtree(final, ignore_errors=True)
        aside.rename(final)
        kept = sorted((d for d in self.root.iterdir() if d.is_dir() and d.name.startswith("step_")),
                      key=lambda d: step_of(d.name))
        for old in kept[:-self.keep]:
            shutil.rmtree(old)
