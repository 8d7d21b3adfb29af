"""Loaded by the Python of a stage that tests/test_kill.py starts (this folder is put first on its
PYTHONPATH). With KILL_PAUSE="<name>:<point>:<n>" it stops the process for good at the n-th time an
atomic_dir of an output named <name> reaches <point>, after writing the file KILL_MARKER, so that the
test can kill it there whatever the machine's load:
  enter: its temporary directory has just appeared, empty;
  rename: everything is written into the temporary directory, not yet renamed onto the output;
  exit: the output is in place (a training checkpoint, say).
"""
import contextlib
import os
import time
from pathlib import Path

if "KILL_PAUSE" in os.environ:
    import digit.io

    name, point, nth = os.environ["KILL_PAUSE"].split(":")
    seen = {"enter": 0, "rename": 0, "exit": 0}
    atomic_dir = digit.io.atomic_dir

    def reached(path, where):
        if Path(path).name != name:
            return
        seen[where] += 1
        if where == point and seen[where] == int(nth):
            Path(os.environ["KILL_MARKER"]).write_text(str(path))
            time.sleep(3600)  # until the test kills it

    @contextlib.contextmanager
    def paused_atomic_dir(path):
        with atomic_dir(path) as tmp:
            reached(path, "enter")
            yield tmp
            reached(path, "rename")
        reached(path, "exit")

    digit.io.atomic_dir = paused_atomic_dir
