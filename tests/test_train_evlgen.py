"""EVLGen end to end through train.py: 2 gloo processes train, evaluate, checkpoint, then resume."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lavis_evlgen.common.checkpoint import load_checkpoint
from launch import free_port, subprocess_env

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "projects/evlgen/tiny/caption.yaml"


def torchrun(tmp_path: Path, *options: str) -> Path:
    """Run train.py on 2 CPU processes; return the job's output directory."""
    out = tmp_path / "out"
    before = set(out.glob("*")) if out.exists() else set()
    command = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", str(REPO / "train.py"), "--cfg-path", str(CONFIG),
               "--options", f"run.output_dir={out}", *options]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = set(out.glob("*")) - before
    return job


@pytest.mark.slow
def test_two_process_train_eval_checkpoint_resume(tmp_path):
    first = torchrun(tmp_path, "run.max_epoch=1")
    checkpoint = load_checkpoint(first / "checkpoint_latest.pth")
    assert checkpoint["epoch"] == 0
    assert set(checkpoint["model"]) and all(k.split(".")[0] in {"ln_vision", "vit_proj", "connector", "llm_proj"}
                                           for k in checkpoint["model"])
    metrics = json.loads((first / "metrics_test.json").read_text())
    assert {"CIDEr", "Bleu_4", "METEOR", "ROUGE_L"} <= set(metrics)

    resumed = torchrun(tmp_path, "run.max_epoch=2", f"run.resume_ckpt_path={first / 'checkpoint_latest.pth'}")
    after = load_checkpoint(resumed / "checkpoint_latest.pth")
    assert after["epoch"] == 1  # continued at epoch 1, not from scratch
    step = lambda c: c["optimizer"]["state"][0]["step"]  # noqa: E731
    assert step(after) == 2 * step(checkpoint)  # the optimizer state carried over
    moved = [not torch.equal(after["model"][k], checkpoint["model"][k]) for k in checkpoint["model"]
             if checkpoint["model"][k].is_floating_point()]
    assert any(moved)
