"""Kills that leave nothing behind: torchrun workers exit within seconds of their launcher's death
(lavis_evlgen.runners.distributed.exit_with_parent), and nothing keeps writing the run directory."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import toy_plugin
from launch import DIST_ENV, free_port

REPO = Path(__file__).resolve().parents[1]


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_orphan_exits_when_its_parent_is_killed(tmp_path):
    """A process running exit_with_parent outlives a SIGKILLed parent by at most a poll interval."""
    child = ("from lavis_evlgen.runners.distributed import exit_with_parent; import time, pathlib; "
             f"exit_with_parent(0.2); pathlib.Path({str(tmp_path / 'ready')!r}).touch(); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(120)"],
                              start_new_session=True)
    try:
        _wait_for(lambda: (tmp_path / "ready").exists(), 120, "the child to start watching")
        (orphan,) = _children(parent.pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        _wait_for(lambda: not _alive(orphan), 3, f"orphan {orphan} to exit")
    finally:
        parent.kill()


@pytest.mark.slow
def test_killed_launcher_leaves_no_worker_writing(tmp_path):
    config = toy_plugin.write_toy_config(tmp_path, task="evlgen_captioning", max_epoch=100000, valid_splits=[],
                                         test_splits=[])
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", str(Path(toy_plugin.__file__)), "--cfg-path", str(config)]
    with open(tmp_path / "log.txt", "w") as log:
        launcher = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        checkpoint = _wait_for(lambda: next((tmp_path / "output").glob("*/checkpoint_latest.pth"), None), 240,
                               "the workers' first checkpoint")
        workers = _children(launcher.pid)
        assert len(workers) >= 2, (tmp_path / "log.txt").read_text()[-2000:]
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's process group: the workers are not in it
        launcher.wait()
        _wait_for(lambda: not any(_alive(w) for w in workers), 5, f"workers {workers} to exit")
        stamp = checkpoint.stat().st_mtime_ns
        time.sleep(2)
        assert checkpoint.stat().st_mtime_ns == stamp
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
