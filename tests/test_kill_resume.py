"""A training process killed with SIGKILL resumes from its checkpoint to identical weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("checkpointed_training.py")
STEPS = 60


def _run(workdir: Path, pause: float = 0.0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(workdir), str(STEPS), str(pause)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _finish(process: subprocess.Popen[bytes]) -> int:
    _, stderr = process.communicate(timeout=120)  # waits and closes the pipe
    assert process.returncode == 0, stderr.decode()[-2000:]
    return process.returncode


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir()
    killed.mkdir()
    _finish(_run(clean))

    victim = _run(killed, pause=0.05)
    deadline = time.monotonic() + 60
    while not (killed / "checkpoint.pt").exists():  # wait for at least one checkpoint
        assert time.monotonic() < deadline, "no checkpoint was written"
        assert victim.poll() is None, "the training process ended before a checkpoint"
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "final.pt").exists()
    saved_at = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < saved_at < STEPS

    _finish(_run(killed))
    expected = torch.load(clean / "final.pt", weights_only=True)
    resumed = torch.load(killed / "final.pt", weights_only=True)
    for a, b in zip(expected, resumed, strict=True):
        assert torch.equal(a, b)
