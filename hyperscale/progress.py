"""Progress of long loops on the console: done/total, rate, a few values, elapsed time, ETA.

Standard library only, so every layer may use it (the training loop, the benchmarks, the job
scripts). Where the stream is a terminal (a tty) one line is redrawn in place as a bar; anywhere
else (a file, a pipe, ``ray job logs``) plain lines are printed, at most one per
``min_interval`` seconds plus the first and the last, so a log stays short and readable.

    with Progress(total=len(batches), desc="teacher-ddim 50 steps", unit="batch") as p:
        for batch in batches:
            ...
            p.update(1, fields={"samples/s": rate})

The training loop does not own its console (a Ray Train worker's output is not the person's
console): it calls :func:`training_step`, which hands the step to this process's *sink*. The
default sink draws a :class:`Progress` here (``--no-ray``, a debugger, a Tune trial's own log);
``hyperscale.train.console`` installs a sink in Ray Train's rank-0 worker that forwards the
step to the driver, which draws the one display the person sees.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import threading
import time
from typing import Callable, TextIO

PREFIX = "[hyperscale]"


def format_duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``1d03h``; ``--`` when unknown (no rate yet, not finite)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def eta_seconds(done: float, total: float | None, elapsed: float) -> float | None:
    """Time left at the average rate so far; None before anything is done or without a total."""
    if total is None or done <= 0 or elapsed <= 0:
        return None
    return max(0.0, (total - done) * elapsed / done)


def format_value(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def format_bar(fraction: float, width: int) -> str:
    fraction = min(1.0, max(0.0, fraction))
    filled = int(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def format_line(desc: str, done: float, total: float | None, *, unit: str = "", elapsed: float = 0.0,
                eta: float | None = None, fields: dict | None = None, bar_width: int = 0) -> str:
    """One progress line: ``desc [bar] done/total unit (pct)  ETA t  elapsed e  rate  k=v ...``
    (ETA first after the count, so a line cut to a narrow terminal keeps it)."""
    parts = [desc] if desc else []
    count = f"{format_value(done)}/{format_value(total)}" if total else f"{format_value(done)}"
    if unit:
        count += f" {unit}"
    if total:
        if bar_width > 0:
            parts.append(format_bar(done / total, bar_width))
        count += f" ({100 * min(1.0, done / total):.0f}%)"
    parts.append(count)
    parts.append(f"ETA {format_duration(eta)}" if done < (total or math.inf) else "done")
    parts.append(f"elapsed {format_duration(elapsed)}")
    parts.extend(f"{v:.1f} {k}" if k.endswith("/s") and isinstance(v, (int, float)) else f"{k}={format_value(v)}"
                 for k, v in (fields or {}).items() if v is not None)
    return "  ".join(parts)


def is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A progress display for one loop over ``total`` units (see the module docstring).

    ``update(n)`` / ``set(done)`` advance it; ``eta`` overrides the average-rate estimate (the
    training loop passes its own); ``message`` prints a line above the bar. ``tty=None`` asks
    the stream; ``min_interval`` bounds how often plain lines are printed (0: every update)."""

    def __init__(self, total: float | None, desc: str = "", unit: str = "", *, stream: TextIO | None = None,
                 tty: bool | None = None, min_interval: float = 15.0, prefix: str = PREFIX,
                 clock: Callable[[], float] = time.monotonic, start: float | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stdout
        self.tty = is_tty(self.stream) if tty is None else tty
        self.min_interval, self.prefix, self.clock = min_interval, prefix, clock
        self.start = clock() if start is None else start  # ``start``: the loop began before the display
        self.done: float = 0
        self.fields: dict = {}
        self.eta: float | None = None
        self._eta_at = self.start
        self._last_printed_done: float | None = None
        self._last_plain: float | None = None
        self._last_drawn: float | None = None
        self._shown = False  # a bar is on the current terminal line
        self._closed = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ state
    def set(self, done: float, fields: dict | None = None, eta: float | None = None, total: float | None = None,
            force: bool = False) -> None:
        with self._lock:
            if total is not None:
                self.total = total
            self.done = done
            if fields is not None:
                self.fields = dict(fields)
            self.eta, self._eta_at = eta, self.clock()
            self._draw(force)

    def update(self, n: float = 1, fields: dict | None = None) -> None:
        self.set(self.done + n, fields if fields is not None else self.fields)

    def tick(self) -> None:
        """Redraw a terminal's bar (elapsed time and ETA move on between updates)."""
        with self._lock:
            if self.tty and self._shown and not self._closed:
                self._draw()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def current_eta(self) -> float | None:
        """The caller's ETA, counted down since it was given; else the average-rate estimate."""
        if self.eta is not None:
            return max(0.0, self.eta - (self.clock() - self._eta_at))
        return eta_seconds(self.done, self.total, self.elapsed())

    def line(self, bar_width: int = 0) -> str:
        eta = self.current_eta()
        head = f"{self.prefix} {self.desc}".strip() if self.prefix else self.desc
        return format_line(head, self.done, self.total, unit=self.unit, elapsed=self.elapsed(), eta=eta,
                           fields=self.fields, bar_width=bar_width)

    # ------------------------------------------------------------------ output
    def _draw(self, force: bool = False) -> None:
        now = self.clock()
        finished = self.total is not None and self.done >= self.total
        if self.tty:
            if not force and not finished and self._last_drawn is not None and now - self._last_drawn < 0.1:
                return
            self.stream.write("\r\x1b[K" + self._fitted())
            self._shown = True
            self._last_drawn = now
        else:
            if not (force or finished or self._last_plain is None or now - self._last_plain >= self.min_interval):
                return
            if finished and self._last_plain is not None and self._last_printed_done == self.done:
                return
            self.stream.write(self.line() + "\n")
            self._last_plain = now
            self._last_printed_done = self.done
        self.stream.flush()

    def _fitted(self) -> str:
        """The terminal's line: with the bar, cut to the width (the values at the end go first;
        the count and the ETA come early); no bar on a very narrow terminal."""
        width = shutil.get_terminal_size((100, 20)).columns
        return self.line(bar_width=20 if width >= 80 else 0)[:max(10, width - 1)]

    def message(self, text: str) -> None:
        """A line of its own, above the bar on a terminal."""
        with self._lock:
            if self.tty and self._shown:
                self.stream.write("\r\x1b[K")
            self.stream.write(text.rstrip("\n") + "\n")
            if self.tty and self._shown and not self._closed:
                self.stream.write(self._fitted())
            self.stream.flush()

    def close(self) -> None:
        """Leave the last state on screen (a terminal gets its newline; a log its last line)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.tty:
                if self._shown:
                    self.stream.write("\r\x1b[K" + self._fitted() + "\n")
            elif self._last_plain is not None and self._last_printed_done != self.done:
                self.stream.write(self.line() + "\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable, total: int | None = None, desc: str = "", unit: str = "", **kw):
    """Iterate with a :class:`Progress` (like tqdm): ``for b in progress(batches, desc=...)``."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, desc, unit, **kw) as p:
        for item in iterable:
            yield item
            p.update(1)


# ---------------------------------------------------------------- the training loop's sink

def training_fields(metrics: dict, samples_per_s: float | None) -> dict:
    """What a training progress line shows: samples/s, then the losses and evaluation metrics."""
    fields = {"samples/s": samples_per_s} if samples_per_s is not None else {}
    fields |= {k: v for k, v in metrics.items() if k.startswith(("loss/", "eval/"))}
    return fields


class ConsoleSink:
    """The default sink: a :class:`Progress` in this very process, made at the first step."""

    def __init__(self, desc: str = "train", stream: TextIO | None = None, tty: bool | None = None):
        self.desc, self.stream, self.tty = desc, stream, tty
        self.display: Progress | None = None
        self.start = time.monotonic()  # elapsed counts from here: start-up included

    def step(self, event: dict) -> None:
        if self.display is None or self.display.total != event["total"]:
            if self.display is not None:
                self.display.close()
            self.display = Progress(event["total"], self.desc, "steps", stream=self.stream, tty=self.tty,
                                    min_interval=0.0, start=self.start)
        self.display.set(event["step"], event["fields"], eta=event.get("eta"))

    def message(self, text: str) -> None:
        if self.display is not None:
            self.display.message(text)
        else:
            print(text, file=self.stream or sys.stdout, flush=True)

    def tick(self) -> None:
        if self.display is not None:
            self.display.tick()

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
            self.display = None


_sink = None


def set_sink(sink) -> None:
    """Where this process's training steps go: an object with ``step(event)`` (and optionally
    ``close()``), or None for the default console sink."""
    global _sink
    _sink = sink


def get_sink():
    global _sink
    if _sink is None:
        _sink = ConsoleSink(os.environ.get("HYPERSCALE_PROGRESS_DESC", "train"))
    return _sink


def training_step(step: int, total: int, metrics: dict, samples_per_s: float | None = None,
                  eta_s: float | None = None) -> None:
    """Called by the training loop on rank 0 at every logged step."""
    get_sink().step({"step": step, "total": total, "fields": training_fields(metrics, samples_per_s),
                     "eta": eta_s})


def training_done() -> None:
    sink = get_sink()
    if hasattr(sink, "close"):
        sink.close()
