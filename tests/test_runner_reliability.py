"""The runners' reliability guarantees on the CPU with the toy model: a non-finite loss stops
the run, resuming from any checkpoint is bitwise exact, checkpoints cannot half-load, saves
leave no temporary files, the numbered checkpoints are pruned to run.keep_checkpoints."""
import builtins
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import lavis_evlgen.runners  # noqa: F401  (registers the runners)
import lavis_evlgen.tasks  # noqa: F401  (registers the tasks)
import toy_plugin
from launch import DIST_ENV, subprocess_env
from lavis_evlgen.common import rng
from lavis_evlgen.common.checkpoint import (
    CheckpointMismatchError,
    CheckpointReadError,
    NonFiniteCheckpointError,
    StrictCheckpointLoading,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state_dict,
)
from lavis_evlgen.runners import runner_evlgen
from lavis_evlgen.runners.grad_clip import GradNormClip
from lavis_evlgen.runners.nonfinite import NonFiniteGuard, NonFiniteLossError

sys.path.insert(0, str(toy_plugin.REPO_ROOT))  # train.py is a script at the repo root
import train  # noqa: E402

# Dropout (torch's generator) and a data augmentation (NumPy's and Python's, in training and in
# validation): a resumed run is exact only when every generator's state is restored.
RANDOM = {"model": {"dropout": 0.5}, "noise": 0.1}


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for key in DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(builtins, "print", builtins.print)


def build(root, **kwargs):
    return train.build_runner(["--cfg-path", str(toy_plugin.write_toy_config(root, **kwargs))])


def weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def train_logs(runner) -> list[dict]:
    return [json.loads(line) for line in (runner.output_dir / "log.txt").read_text().splitlines() if line.startswith('{"train_')]


# ---------------------------------------------------------------------- exact resume
RUNS = {
    "epoch": {"runner": "runner_evlgen", "max_epoch": 3},
    # 4 batches per data epoch: checkpoints at iterations 3 and 6 are mid data-epoch.
    "iter": {"runner": "runner_evlgen_iter", "max_iters": 9, "iters_per_inner_epoch": 3},
}


@pytest.mark.parametrize("kind", RUNS)
def test_resume_from_every_checkpoint_is_bitwise_exact(tmp_path, kind):
    run = {**RUNS[kind], "valid_splits": [], "test_splits": []}  # a numbered checkpoint per (inner) epoch
    straight = build(tmp_path / "straight", **RANDOM, **run)
    straight.train()
    final = weights(straight.output_dir / "checkpoint_latest.pth")
    intermediate = sorted(straight.output_dir.glob("checkpoint_[0-9]*.pth"), key=lambda p: int(p.stem.split("_")[1]))[:-1]
    assert len(intermediate) == 2
    for n, checkpoint in enumerate(intermediate):
        resumed = build(tmp_path / f"resumed{n}", **RANDOM, **run, resume_ckpt_path=str(checkpoint))
        resumed.train()
        after = load_checkpoint(resumed.output_dir / "checkpoint_latest.pth")
        assert after["iters"] == load_checkpoint(straight.output_dir / "checkpoint_latest.pth")["iters"]
        for key, value in final.items():
            assert torch.equal(after["model"][key], value), (checkpoint.name, key)


def test_resume_from_best_with_validation_is_bitwise_exact(tmp_path):
    """Validation draws from NumPy and Python (the augmentation runs on val too): the training's
    RNGs are rewound after it, so resuming from checkpoint_best continues what the straight run did."""
    straight = build(tmp_path / "straight", **RANDOM, max_epoch=3, test_splits=[])
    straight.train()
    best = straight.output_dir / "checkpoint_best.pth"
    assert load_checkpoint(best)["epoch"] < 2
    resumed = build(tmp_path / "resumed", **RANDOM, max_epoch=3, test_splits=[], resume_ckpt_path=str(best))
    resumed.train()
    final, after = (weights(r.output_dir / "checkpoint_latest.pth") for r in (straight, resumed))
    assert all(torch.equal(after[k], v) for k, v in final.items())


def test_resume_without_the_rng_states_differs(tmp_path, monkeypatch):
    """The exactness above is not vacuous: not restoring the RNGs changes the result."""
    run = {**RUNS["epoch"], "valid_splits": [], "test_splits": []}
    straight = build(tmp_path / "straight", **RANDOM, **run)
    straight.train()
    monkeypatch.setattr(runner_evlgen, "restore_rank_rng_state", lambda states, source, cuda: False)
    resumed = build(tmp_path / "resumed", **RANDOM, **run, resume_ckpt_path=str(straight.output_dir / "checkpoint_0.pth"))
    resumed.train()
    final, after = (weights(r.output_dir / "checkpoint_latest.pth") for r in (straight, resumed))
    assert not all(torch.equal(after[k], v) for k, v in final.items())


def test_checkpoint_rng_states_round_trip(tmp_path):
    runner = build(tmp_path, max_epoch=1, valid_splits=[], test_splits=[])
    runner.train()
    (state,) = load_checkpoint(runner.output_dir / "checkpoint_latest.pth")["rng"]
    assert set(state) == {"python", "numpy", "torch", "cuda"}
    rng.restore_rng_state(state, cuda=False)
    first = (torch.rand(3), np.random.rand(), random.random())
    rng.restore_rng_state(state, cuda=False)
    assert (torch.rand(3).tolist(), np.random.rand(), random.random()) == (first[0].tolist(), *first[1:])


def test_resume_from_a_checkpoint_without_rng_warns(tmp_path, caplog):
    runner = build(tmp_path / "a", max_epoch=1, valid_splits=[], test_splits=[])
    runner.train()
    path = runner.output_dir / "checkpoint_0.pth"
    checkpoint = load_checkpoint(path)
    del checkpoint["rng"]  # as written before the RNG states were recorded
    save_checkpoint(checkpoint, path)
    resumed = build(tmp_path / "b", max_epoch=2, valid_splits=[], test_splits=[], resume_ckpt_path=str(path))
    resumed.train()
    assert any("holds no RNG state" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- non-finite loss
def nan_at(monkeypatch, *positions: tuple[int, int]) -> list:
    """Make the toy's loss NaN at the given (epoch, iteration) positions; returns the image ids
    of those batches, filled in as they come."""
    forward, seen = toy_plugin.ToyModel.forward, []

    def poisoned(self, samples):
        out = forward(self, samples)
        if (samples["epoch"], samples["iters"]) in positions:
            seen.append(samples["image_id"].tolist())
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(toy_plugin.ToyModel, "forward", poisoned)
    return seen


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    seen = nan_at(monkeypatch, (1, 2))
    runner = build(tmp_path, max_epoch=3, valid_splits=[], test_splits=[])
    with pytest.raises(NonFiniteLossError) as error:
        runner.train()
    message = str(error.value)
    assert "non-finite loss at step 6 (epoch 1, iteration 2 of 4" in message  # 4 batches per epoch
    assert f"'image_id': {seen[0]}" in message and "run.max_nonfinite_steps=0" in message
    latest = load_checkpoint(runner.output_dir / "checkpoint_latest.pth")
    assert latest["epoch"] == 0 and all(torch.isfinite(v).all() for v in latest["model"].values())
    assert sorted(p.name for p in runner.output_dir.glob("checkpoint_*.pth")) == ["checkpoint_0.pth", "checkpoint_latest.pth"]


def test_tolerated_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    nan_at(monkeypatch, (1, 2))
    runner = build(tmp_path, max_epoch=2, valid_splits=[], test_splits=[], max_nonfinite_steps=1)
    runner.train()
    assert [log["train_nonfinite_steps_skipped"] for log in train_logs(runner)] == [0, 1]
    latest = load_checkpoint(runner.output_dir / "checkpoint_latest.pth")
    assert latest["optimizer"]["state"][0]["step"] == 2 * 4 - 1  # the bad step did not update
    assert all(torch.isfinite(v).all() for v in latest["model"].values())


def test_consecutive_nonfinite_steps_beyond_the_tolerance_stop(tmp_path, monkeypatch):
    nan_at(monkeypatch, (0, 1), (0, 2))
    runner = build(tmp_path, max_epoch=1, valid_splits=[], test_splits=[], max_nonfinite_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"at step 2 .*2 bad step\(s\) in a row"):
        runner.train()
    assert not list(runner.output_dir.glob("checkpoint_*.pth"))


def test_huge_learning_rate_stops_before_a_checkpoint(tmp_path):
    """The issue's case: lr 1e30 used to train to the end and save 42 of 42 tensors NaN."""
    runner = build(tmp_path, max_epoch=2, init_lr=1e30, warmup_lr=1e30, valid_splits=[], test_splits=[])
    with pytest.raises(NonFiniteLossError, match=r"step 1 \(epoch 0, iteration 1 of 4"):
        runner.train()
    assert not list(runner.output_dir.glob("checkpoint_*"))


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(2, 1)

    def forward(self, samples: dict) -> dict:
        return {"loss": self.w(samples["x"]).sum()}


def test_a_step_that_makes_weights_nonfinite_raises_whatever_the_tolerance():
    model = Regressor()
    guard = NonFiniteGuard(torch.optim.SGD(model.parameters(), lr=1e38), model, max_consecutive=5, device=torch.device("cpu"))
    samples = {"x": torch.full((2, 2), 100.0), "epoch": 0, "iters": 3, "num_iters_per_epoch": 4, "image_id": torch.tensor([7, 9])}
    model(samples)["loss"].backward()  # finite loss and gradients (200); lr x 200 overflows float32
    with pytest.raises(NonFiniteLossError, match=r"became non-finite .*step 3 \(epoch 0, iteration 3 of 4; rank 0; batch \{'image_id': \[7, 9\]\}"):
        guard.step()


def test_save_refuses_nonfinite_weights(tmp_path):
    path = tmp_path / "checkpoint_latest.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 0}, path)
    with pytest.raises(NonFiniteCheckpointError, match=r"not saving .*checkpoint_latest.pth: 1 tensors .*\['w'\]"):
        save_checkpoint({"model": {"w": torch.tensor([1.0, float("inf")])}, "epoch": 1}, path)
    assert load_checkpoint(path)["epoch"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pth"]


@pytest.mark.parametrize("key, value, allowed", [
    ("max_nonfinite_steps", -1, "an integer >= 0"), ("keep_checkpoints", 0, "an integer >= 1 or null"),
    ("keep_checkpoints", "2", "an integer >= 1 or null"), ("max_grad_norm", 0, "a number > 0 or null"),
    ("max_grad_norm", "1.0", "a number > 0 or null"), ("max_grad_norm", float("inf"), "a number > 0 or null"),
])
def test_runner_options_are_checked(tmp_path, key, value, allowed):
    with pytest.raises(ValueError, match=re.escape(f"run.{key}: expected {allowed}, got {value!r}")):
        build(tmp_path, **{key: value})


# ---------------------------------------------------------------------- gradient clipping
def test_grad_norm_clip_scales_the_step_to_the_norm():
    model = Regressor()
    clip = GradNormClip(torch.optim.SGD(model.parameters(), lr=1.0), max_norm=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    model({"x": torch.full((2, 2), 100.0)})["loss"].backward()  # dw = (200, 200), db = 2
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    clip.step()
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert clip.last_norm == pytest.approx(norm) and norm > 200
    assert step.norm().item() == pytest.approx(0.5, rel=1e-5)  # SGD at lr 1 moves by the clipped gradient


def test_max_grad_norm_clips_inside_the_runner(tmp_path):
    clipped = build(tmp_path / "clipped", max_epoch=1, valid_splits=[], test_splits=[], max_grad_norm=1e-3)
    plain = build(tmp_path / "plain", max_epoch=1, valid_splits=[], test_splits=[])
    clipped.train()
    plain.train()
    assert isinstance(clipped.optimizer.optimizer, GradNormClip) and not isinstance(plain.optimizer.optimizer, GradNormClip)
    assert clipped.optimizer.optimizer.last_norm > 1e-3
    a, b = weights(clipped.output_dir / "checkpoint_latest.pth"), weights(plain.output_dir / "checkpoint_latest.pth")
    assert any(not torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- checkpoints
class Small(StrictCheckpointLoading, nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 4)


def test_a_shape_mismatch_loads_nothing(tmp_path):
    source, target = Small(), Small()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = trainable_state_dict(source)
    state["b.bias"] = torch.zeros(5)  # the last key in order: everything before it would be copied
    with pytest.raises(CheckpointMismatchError, match=r"ckpt.pth: 1 tensors .*b.bias: checkpoint \(5,\), model \(4,\)"):
        load_trainable_state(target, state, source="ckpt.pth")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def small_checkpoint(path, arch="evlgen_vicuna", model_type="tiny"):
    save_checkpoint({"model": trainable_state_dict(Small()), "arch": arch, "model_type": model_type}, path)
    return path


@pytest.mark.parametrize("arch, model_type, differs", [("evlgen_vicuna", "tiny", "arch 'evlgen_vicuna' (this model: 'evlgen_opt')"),
                                                        ("evlgen_opt", "mini", "model_type 'mini' (this model: 'tiny')")])
def test_a_checkpoint_of_another_model_is_refused(tmp_path, arch, model_type, differs):
    path = small_checkpoint(tmp_path / "ckpt.pth", arch, model_type)
    model = Small()
    model.load_checkpoint_from_config({"arch": "evlgen_opt", "model_type": "tiny"})
    before = model.a.weight.clone()
    with pytest.raises(CheckpointMismatchError, match=rf"ckpt.pth was written by another model: {re.escape(differs)}; set model.allow_other_model_checkpoint"):
        model.load_checkpoint(str(path))
    assert torch.equal(model.a.weight, before)

    model.load_checkpoint_from_config({"arch": "evlgen_opt", "model_type": "tiny", "allow_other_model_checkpoint": True})
    assert model.load_checkpoint(str(path)).loaded  # allowed (with a warning)
    assert not torch.equal(model.a.weight, before)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    runner = build(tmp_path / "a", max_epoch=1, valid_splits=[], test_splits=[])
    runner.train()
    path = runner.output_dir / "checkpoint_0.pth"
    checkpoint = load_checkpoint(path)
    assert (checkpoint["arch"], checkpoint["model_type"]) == ("evlgen_toy", "default")
    save_checkpoint({**checkpoint, "arch": "evlgen_vicuna"}, path)
    resumed = build(tmp_path / "b", max_epoch=2, resume_ckpt_path=str(path))
    with pytest.raises(CheckpointMismatchError, match="arch 'evlgen_vicuna' \\(this model: 'evlgen_toy'\\)"):
        resumed.train()
    allowed = build(tmp_path / "c", max_epoch=2, valid_splits=[], test_splits=[], resume_ckpt_path=str(path),
                    model={"allow_other_model_checkpoint": True})
    allowed.train()
    assert load_checkpoint(allowed.output_dir / "checkpoint_latest.pth")["epoch"] == 1


def test_empty_and_truncated_checkpoints_name_the_file(tmp_path):
    path = small_checkpoint(tmp_path / "ckpt.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match=rf"checkpoint {path} \(\d+ bytes\) cannot be read"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointReadError, match=rf"checkpoint {path} is empty"):
        Small().load_checkpoint(str(path))


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = small_checkpoint(tmp_path / "checkpoint_latest.pth")

    def killed(obj, f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pth"]
    assert load_checkpoint(path)["arch"] == "evlgen_vicuna"


def test_sigterm_during_a_save_removes_the_temporary_file_then_reaches_the_previous_handler(tmp_path, monkeypatch):
    path = small_checkpoint(tmp_path / "checkpoint_latest.pth")
    received = []

    def handler(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)

    def terminated(obj, f):
        f.write(b"half a file")
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(torch, "save", terminated)
    try:
        with pytest.raises(InterruptedError, match="interrupted by signal 15"):
            save_checkpoint({"model": {}}, path)
        assert received == [signal.SIGTERM]  # the kill is not swallowed
        assert signal.getsignal(signal.SIGTERM) is handler  # restored after the save
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pth"]
    assert load_checkpoint(path)["arch"] == "evlgen_vicuna"


@pytest.mark.slow
def test_sigterm_during_a_save_leaves_no_temporary_file(tmp_path):
    """The process still dies by SIGTERM, after the temporary file is gone."""
    path = small_checkpoint(tmp_path / "checkpoint_latest.pth")
    code = textwrap.dedent(f"""
        import sys, time, torch
        from lavis_evlgen.common.checkpoint import save_checkpoint
        def slow(obj, f):
            f.write(b"half a file"); f.flush()
            print("writing", flush=True)
            time.sleep(60)
        torch.save = slow
        save_checkpoint({{"model": {{}}}}, {str(path)!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert child.stdout.readline() == "writing\n"
    assert len(list(tmp_path.glob("*.tmp"))) == 1
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == -signal.SIGTERM
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pth"]
    assert load_checkpoint(path)["arch"] == "evlgen_vicuna"


def test_stale_temporary_files_of_killed_saves_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    host = socket.gethostname()
    stale = tmp_path / f"checkpoint_latest.pth.{host}.{dead}.tmp"
    live = tmp_path / f"checkpoint_best.pth.{host}.{os.getpid()}.tmp"  # a save in progress
    stale.write_bytes(b"")
    live.write_bytes(b"")
    small_checkpoint(tmp_path / "checkpoint_latest.pth")
    assert not stale.exists() and live.exists()


def test_keep_checkpoints_prunes_the_numbered_ones(tmp_path):
    runner = build(tmp_path, max_epoch=4, valid_splits=[], test_splits=[], keep_checkpoints=2)
    runner.train()
    names = sorted(p.name for p in runner.output_dir.glob("checkpoint_*.pth"))
    assert names == ["checkpoint_2.pth", "checkpoint_3.pth", "checkpoint_latest.pth"]


@pytest.mark.slow
def test_tiny_evlgen_resumed_mid_data_epoch_is_bitwise_exact(tmp_path):
    """The real tiny EVLGen (dropout in its connector and LLM), iteration runner, resumed at
    iteration 2 of a 4-batch data epoch."""
    config = toy_plugin.REPO_ROOT / "projects/evlgen/tiny/caption.yaml"
    options = ["run.runner=runner_evlgen_iter", "run.max_iters=6", "run.iters_per_inner_epoch=2",
               "run.valid_splits=[]", "run.test_splits=[]"]

    def run(out: str, *extra: str):
        runner = train.build_runner(["--cfg-path", str(config), "--options", f"run.output_dir={tmp_path / out}", *options, *extra])
        runner.train()
        return runner.output_dir

    straight = run("straight")
    resumed = run("resumed", f"run.resume_ckpt_path={straight / 'checkpoint_2.pth'}")
    final, after = weights(straight / "checkpoint_latest.pth"), weights(resumed / "checkpoint_latest.pth")
    assert all(torch.equal(after[k], v) for k, v in final.items())
