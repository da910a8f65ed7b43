"""Ctrl-C, once or many times, mid-conversion: one line, exit 130, and the output resumes byte-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from checks import FAST, snapshot
from nvfp4_convert.cli import app

# The CLI in a child process whose reader thread takes a while per unit (as on a large model), and which
# creates MARKER once the first output shard is recorded: a signal sent after that lands mid-conversion,
# with the reader and writer threads busy.
SLOW = """
import atexit, sys, time
from pathlib import Path
import nvfp4_convert.pipeline as pipeline
from nvfp4_convert.output import OutputDir
marker = Path(sys.argv.pop(1))
load, record = pipeline._load, OutputDir.record
def slow_load(*args, **kwargs):
    time.sleep(0.15)
    return load(*args, **kwargs)
def recorded(self, *args, **kwargs):
    record(self, *args, **kwargs)
    marker.touch()
pipeline._load, OutputDir.record = slow_load, recorded
atexit.register(time.sleep, 5)  # a slow exit, as joining busy worker threads and library finalizers can be
from nvfp4_convert.cli import main
main(sys.argv[1:])
"""
runner = CliRunner()

LINE = "interrupted; run the same command again to resume"


@pytest.fixture(scope="module")
def clean_run(tiny, tmp_path_factory):
    src = tiny("llama")
    out = tmp_path_factory.mktemp("clean") / "out"
    result = runner.invoke(app, ["convert", str(src), str(out), "--max-shard-size", "20KB", *FAST])
    assert result.exit_code == 0, result.output
    return src, snapshot(out)


@pytest.mark.parametrize("when", ["during-cleanup", "during-exit"])
def test_repeated_interrupts_end_in_one_line_and_resume(clean_run, tmp_path, when):
    """The first Ctrl-C unwinds the run; more of them, while it cleans up or while the interpreter exits,
    end it at once: one line either way, exit 130, and the same command then finishes the job."""
    src, expected = clean_run
    out, marker = tmp_path / "out", tmp_path / "first-shard"
    args = [str(src), str(out), "--max-shard-size", "20KB", *FAST]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    child = subprocess.Popen([sys.executable, "-c", SLOW, str(marker), *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    first = ""
    if when == "during-exit":  # the run has unwound and printed its line; the exit is under way
        first = child.stderr.readline()
        assert first == LINE + "\n", first + child.communicate()[1]
    for gap in (0.02, 0.05, 0.1):
        time.sleep(gap)
        child.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, err = child.communicate(timeout=30)
    assert time.monotonic() - start < 3  # ended by the interrupts, not by the slow exit running out
    assert child.returncode == 130, err
    assert (first + err).strip().splitlines() == [LINE], first + err
    assert not (out / "config.json").exists()
    resumed = runner.invoke(app, ["convert", *args])
    assert resumed.exit_code == 0, resumed.output
    assert snapshot(out) == expected
