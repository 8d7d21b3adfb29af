"""How far a long stage has got, in its log while it runs: tqdm's count, rate and ETA for loops, and
for the trainings step, loss, lr, tokens/s and ETA, plus live TensorBoard curves.

A stage's log is a file (Snakemake's `log:`, a SLURM output file), not a terminal: there tqdm's
carriage-return redraws would pile up on one line, so each refresh becomes a line of its own, written
at a steady interval (DIGIT_PROGRESS_INTERVAL seconds, default 30). On a terminal tqdm draws its bar
as usual.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

INTERVAL_ENV = "DIGIT_PROGRESS_INTERVAL"


def interval_s() -> float:
    return float(os.environ.get(INTERVAL_ENV, 30))


class _Lines:
    """A stream for tqdm that writes each redraw as one line (no carriage returns, no cursor moves)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").replace("\x1b[A", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it", stream=None) -> tqdm:
    """tqdm over `iterable` (or updated by hand), drawn for a terminal or logged as lines."""
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
    every = interval_s()
    # maxinterval: tqdm's monitor thread would otherwise stretch the interval of a slow loop
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=_Lines(stream), mininterval=every,
                maxinterval=max(every, 1.0), ascii=True, ncols=100)


def tensorboard_dir(out_dir: str | Path, name: str) -> Path:
    """results/<experiment>/logs/tensorboard/<name> for the output results/<experiment>/<stage>: beside the
    stage logs (`tensorboard --logdir results/<experiment>/logs/tensorboard`), never among the outputs."""
    return Path(out_dir).parent / "logs" / "tensorboard" / name


class TrainingLog:
    """Step, loss, lr, tokens/s and ETA of a training, printed at a steady interval and at every
    checkpoint, and written as TensorBoard scalars to `tensorboard_dir` (outside the stage's output:
    event files hold times and host names)."""

    def __init__(self, name: str, total_steps: int, first_step: int, tensorboard_dir: str | Path | None,
                 stream=None):
        self.name, self.total, self.first = name, total_steps, first_step
        self.stream = stream or sys.stdout
        self.start = self.last_print = time.monotonic()
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # on use: it imports tensorboard

            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=first_step + 1)

    def eta_s(self, step: int) -> float | None:
        done = step - self.first
        if done <= 0:
            return None
        return (time.monotonic() - self.start) / done * (self.total - step)

    def step(self, step: int, scalars: dict[str, float], checkpoint: bool = False) -> None:
        """Record `step`'s scalars (loss, lr, tokens_per_s, ...); print them when the interval has passed,
        at a checkpoint (before it is saved) and at the last step."""
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"{self.name}/{key}", value, step)
        now = time.monotonic()
        if checkpoint or step == self.total or now - self.last_print >= interval_s():
            self.last_print = now
            eta = self.eta_s(step)
            shown = " ".join(f"{key} {value:.4g}" for key, value in scalars.items())
            self.stream.write(f"{self.name}: step {step}/{self.total} ({100 * step / self.total:.1f}%) {shown} "
                              f"ETA {format_duration(eta)}{' (checkpoint)' if checkpoint else ''}\n")
            self.stream.flush()
            if self.writer is not None:
                self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))
