"""Launching train.py / evaluate.py under torch.distributed.run from scripts and tests."""
import os
import socket
import subprocess
import sys
from pathlib import Path

from lavis_evlgen.common.paths import PACKAGE_ROOT

REPO_ROOT = PACKAGE_ROOT.parent
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port free on loopback now (torchrun's --master_port=0 hangs the static rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment without any torchrun variables, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, **extra}


def launch_job(script: str, cfg: Path, nproc: int, output_dir: Path, options: list[str], log: Path | None = None) -> Path:
    """Run the repository's ``script`` (train.py | evaluate.py) on ``cfg`` under torch.distributed.run.

    ``run.output_dir`` is set to ``output_dir``; stdout/stderr go to ``log`` when given (else to
    this process's). Raises CalledProcessError naming the command on failure.
    Returns the job directory the run created under ``output_dir``.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    before = set(output_dir.iterdir())
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
               str(REPO_ROOT / script), "--cfg-path", str(cfg), "--options", f"run.output_dir={output_dir}", *options]
    print("$", " ".join(command), flush=True)
    if log is None:
        subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), check=True)
    else:
        with open(log, "w") as f:
            result = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, command, output=f"see {log}")
    (job,) = [p for p in set(output_dir.iterdir()) - before if p.is_dir()]
    return job
