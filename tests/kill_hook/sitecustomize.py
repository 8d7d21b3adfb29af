"""Loaded by the Python of a stage that tests/test_kill.py starts (this folder is put first on its
PYTHONPATH), directly or as a Snakemake job. With KILL_PAUSE="<name>:<point>:<n>" it stops the
process for good the n-th time it reaches <point>, after writing the file KILL_MARKER, so that the
test can kill it there whatever the machine's load. Points of an atomic_dir whose output path ends
in <name> (a pattern for Path.match: "out", "features/1"):
  enter: its temporary directory has just appeared, empty;
  rename: everything is written into the temporary directory, not yet renamed onto the output;
  exit: the output is in place ("checkpoint": a training checkpoint has been saved).
Any rename (os.replace, os.rename, pathlib's) onto a path that ends in <name>:
  replace: the rename is about to happen ("checkpoint*": a training checkpoint or its pointer is
    about to be put in place; had the old checkpoint been removed first, none would be complete).
Points inside a stage's work (<name> is not used):
  batch: the encoder has just given a batch's features (feature and tokenize shards);
  png: a sample image has just been written (sample shards);
  cache: evaluate has just cached the reference's Inception features (<name>: the .npz).
"""
import contextlib
import functools
import os
import time
from pathlib import Path

if "KILL_PAUSE" in os.environ:
    name, point, nth = os.environ["KILL_PAUSE"].split(":")
    seen = 0

    def reached(where: str, path: str | None = None) -> None:
        global seen
        if where != point or (path is not None and not Path(path).match(name)):
            return
        seen += 1
        if seen == int(nth):
            Path(os.environ["KILL_MARKER"]).write_text(f"{where} {path or ''}")
            time.sleep(3600)  # until the test kills it

    def after(function, where: str):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            reached(where)
            return result
        return wrapper

    def before_rename(rename):
        @functools.wraps(rename)
        def wrapper(src, dst, *args, **kwargs):
            reached("replace", os.fspath(dst))
            return rename(src, dst, *args, **kwargs)
        return wrapper

    if point in ("enter", "rename", "exit"):
        import digit.runtime.io

        atomic_dir = digit.runtime.io.atomic_dir

        @contextlib.contextmanager
        def paused_atomic_dir(path):
            with atomic_dir(path) as tmp:
                reached("enter", path)
                yield tmp
                reached("rename", path)
            reached("exit", path)

        digit.runtime.io.atomic_dir = paused_atomic_dir
        import digit.runtime.checkpoint  # after the patch: it imports atomic_dir by name

        save = digit.runtime.checkpoint.PartialRun.save

        @functools.wraps(save)
        def paused_save(self, *args, **kwargs):
            save(self, *args, **kwargs)
            reached("exit", self.checkpoint)

        digit.runtime.checkpoint.PartialRun.save = paused_save
    elif point == "replace":  # every rename, whoever calls it (io.py, pathlib)
        os.replace, os.rename = before_rename(os.replace), before_rename(os.rename)
    elif point == "batch":  # before the stages import it by name
        import digit.tokenizer.encoders

        encode_batches = digit.tokenizer.encoders.encode_batches

        def paused_encode_batches(*args, **kwargs):
            for batch in encode_batches(*args, **kwargs):
                yield batch
                reached("batch")

        digit.tokenizer.encoders.encode_batches = paused_encode_batches
    elif point == "png":
        import digit.generate.sample

        digit.generate.sample.save_png = after(digit.generate.sample.save_png, "png")
    elif point == "cache":  # the reference features' .npz is the one file evaluate writes with atomic_path
        import digit.evaluate.fidelity

        cache_path = digit.evaluate.fidelity.atomic_path

        @contextlib.contextmanager
        def paused_cache_path(path):
            with cache_path(path) as tmp:
                yield tmp
            reached("cache", str(path))

        digit.evaluate.fidelity.atomic_path = paused_cache_path
    else:
        raise ValueError(f"KILL_PAUSE: unknown point {point!r}")
