"""The runners end to end on the CPU with a toy model: training, evaluation, checkpoints,
exact resume, distributed runs with gloo, and each LAVIS CUDA assumption the runners remove."""
import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import lavis.datasets.data_utils
import pytest
import torch
import torch.distributed as dist
from lavis.common.logger import SmoothedValue
from lavis.common.registry import registry
from lavis.datasets.datasets.dataloader_utils import PrefetchLoader
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lavis_evlgen.runners  # noqa: F401  (registers the runners)
import lavis_evlgen.tasks  # noqa: F401  (registers the tasks)
import toy_plugin
from launch import DIST_ENV, free_port
from lavis_evlgen.common import paths
from lavis_evlgen.common.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state_dict,
)
from lavis_evlgen.runners import init_distributed_mode, runner_evlgen
from lavis_evlgen.runners.runner_evlgen import EpochLoader

sys.path.insert(0, str(toy_plugin.REPO_ROOT))  # train.py is a script at the repo root
import train  # noqa: E402



@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """No torchrun environment leaks in; LAVIS's distributed print patch is undone afterwards."""
    for key in DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(builtins, "print", builtins.print)


def build(root: Path, **run) -> "train.RunnerBase":
    return train.build_runner(["--cfg-path", str(toy_plugin.write_toy_config(root, **run))])


def trainable(runner) -> dict[str, torch.Tensor]:
    model = runner.unwrap_dist_model(runner.model)
    return {k: v.detach().clone() for k, v in trainable_state_dict(model).items() if k.startswith("head.")}


# ---------------------------------------------------------------------- single process
def test_train_evaluate_checkpoint_single_process(tmp_path, monkeypatch):
    def no_cuda(sample):
        raise AssertionError("prepare_sample moved a batch to CUDA on a CPU run")

    monkeypatch.setattr(lavis.datasets.data_utils, "move_to_cuda", no_cuda)
    monkeypatch.chdir(tmp_path)
    runner = build(tmp_path, output_dir="out", device="auto")
    frozen_before = runner.unwrap_dist_model(runner.model).frozen.weight.clone()
    head_before = trainable(runner)

    runner.train()  # 2 epochs: LAVIS's RunnerBase.train would call dist.barrier() here and fail

    assert not dist.is_initialized()
    assert runner.output_dir == tmp_path / "out" / runner.job_id  # relative to the cwd, not lavis/
    assert runner.device == torch.device("cpu")
    assert runner.model is runner.unwrap_dist_model(runner.model)  # not None, not DDP
    assert not isinstance(runner.dataloaders["val"], PrefetchLoader)
    assert isinstance(runner.train_loader, EpochLoader) and not isinstance(runner.train_loader.loader, PrefetchLoader)

    latest = load_checkpoint(runner.output_dir / "checkpoint_latest.pth")
    assert latest["epoch"] == 1 and latest["iters"] == 2 * len(runner.train_loader)
    assert {"optimizer", "scaler", "config", "best"} <= set(latest)
    assert "frozen.weight" not in latest["model"] and "head.weight" in latest["model"]
    assert not torch.equal(latest["model"]["head.weight"], head_before["head.weight"])

    # The test split ran on the best checkpoint, reloaded into the model; frozen weights never change.
    best = load_checkpoint(runner.output_dir / "checkpoint_best.pth")
    model = runner.unwrap_dist_model(runner.model)
    assert torch.equal(model.head.weight, best["model"]["head.weight"])
    assert torch.equal(model.frozen.weight, frozen_before)

    metrics = json.loads((runner.output_dir / "metrics_test.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 100.0 and metrics["num_questions"] == 8
    train_logs = [json.loads(line) for line in (runner.output_dir / "log.txt").read_text().splitlines()
                  if line.startswith('{"train_')]
    assert len(train_logs) == 2 and all(float(log["train_samples_per_s"]) > 0 for log in train_logs)


def test_iter_runner_validates_and_checkpoints_every_inner_epoch(tmp_path):
    runner = build(tmp_path, runner="runner_evlgen_iter", max_iters=6, iters_per_inner_epoch=3)
    runner.train()
    latest = load_checkpoint(runner.output_dir / "checkpoint_latest.pth")
    assert latest["iters"] == 6 and latest["epoch"] == 1  # 4 batches per data epoch
    assert load_checkpoint(runner.output_dir / "checkpoint_best.pth")["iters"] in (3, 6)
    log = (runner.output_dir / "log.txt").read_text()
    assert log.count('"train_samples_per_s"') == 2 and log.count('"val_best_iters"') == 2
    assert (runner.output_dir / "metrics_test.json").is_file()


def test_evaluate_script(tmp_path):
    import evaluate

    evaluate.main(["--cfg-path", str(toy_plugin.write_toy_config(tmp_path))])
    (output_dir,) = (tmp_path / "output").iterdir()
    assert json.loads((output_dir / "metrics_test.json").read_text())["num_questions"] == 8
    assert not list(output_dir.glob("checkpoint_*.pth"))  # evaluation only


def test_evaluate_script_builds_only_the_test_splits(tmp_path):
    import evaluate

    config = toy_plugin.write_toy_config(tmp_path)
    for split in ("train", "val"):  # reading either would fail
        (tmp_path / f"{split}.json").unlink()
    evaluate.main(["--cfg-path", str(config)])
    (output_dir,) = (tmp_path / "output").iterdir()
    assert json.loads((output_dir / "metrics_test.json").read_text())["num_questions"] == 8


@pytest.mark.parametrize("test_splits", [["test"], ["val", "test"]])
def test_build_test_splits_drops_the_splits_a_builder_builds_anyway(test_splits):
    """The shapes builders set all three splits themselves; only the evaluated ones reach the runner."""
    import lavis.tasks
    from lavis.common.config import Config

    argv = ["--cfg-path", str(toy_plugin.REPO_ROOT / "projects/evlgen/tiny/caption.yaml"),
            "--options", f"run.test_splits=[{','.join(test_splits)}]"]
    cfg = Config(train.parse_args(argv))
    datasets = train.build_test_splits(lavis.tasks.setup_task(cfg), cfg)
    assert {name: sorted(splits) for name, splits in datasets.items()} == {"shapes_caption": sorted(test_splits)}


def test_build_test_splits_names_a_split_no_dataset_has(tmp_path):
    import lavis.tasks
    from lavis.common.config import Config

    cfg = Config(train.parse_args(["--cfg-path", str(toy_plugin.write_toy_config(tmp_path)),
                                   "--options", "run.test_splits=[test,dev]"]))
    with pytest.raises(KeyError, match=r"run.test_splits: .*\['dev'\]"):
        train.build_test_splits(lavis.tasks.setup_task(cfg), cfg)


def test_evaluation_logs_progress(tmp_path, monkeypatch, caplog):
    runner = build(tmp_path, batch_size_eval=2)  # 8 val samples: 4 batches
    monkeypatch.setattr(runner_evlgen, "EVAL_PROGRESS_INTERVAL_S", 0.0)  # a line after every batch but the last
    with caplog.at_level("INFO"):
        runner.eval_epoch("val", cur_epoch=0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Evaluating val: ")]
    assert [line.split(",")[0] for line in lines] == [f"Evaluating val: {i}/4 batches" for i in (1, 2, 3)]
    assert all(line.endswith(" s left") for line in lines)


def test_amp_is_off_on_cpu_with_a_warning(tmp_path, caplog):
    runner = build(tmp_path, amp=True)
    assert runner.scaler is None
    assert any("run.amp is on but the device is the CPU" in r.getMessage() for r in caplog.records)


def test_output_dir_absolute_and_registered_paths(tmp_path):
    runner = build(tmp_path)
    assert runner.output_dir == tmp_path / "output" / runner.job_id
    assert registry.get_path("output_dir") == str(runner.output_dir)
    assert registry.get_path("result_dir") == str(runner.output_dir / "result")


def test_cache_root_and_library_root():
    assert registry.get_path("cache_root") == str(paths.cache_root())
    assert not registry.get_path("cache_root").startswith("/export")
    assert Path(registry.get_path("library_root")).name == "lavis"


def test_lr_schedulers_registered_by_the_runner_module():
    code = (
        "import lavis; from lavis.common.registry import registry; "
        "assert registry.get_lr_scheduler_class('linear_warmup_cosine_lr') is None; "
        "import lavis_evlgen.runners; "
        "assert registry.get_lr_scheduler_class('linear_warmup_cosine_lr') is not None; "
        "assert registry.get_lr_scheduler_class('linear_warmup_step_lr') is not None"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(toy_plugin.REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True, env=env, capture_output=True)


def test_unknown_runner_is_a_clear_error(tmp_path):
    with pytest.raises(KeyError, match="run.runner: 'no_such_runner'"):
        build(tmp_path, runner="no_such_runner")


# ---------------------------------------------------------------------- resume
# Exact resume from every checkpoint: test_runner_reliability.py.
def test_resume_from_missing_file_names_it(tmp_path):
    runner = build(tmp_path, resume_ckpt_path=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        runner.train()


# ---------------------------------------------------------------------- distributed
def test_gloo_process_group_of_one(tmp_path, monkeypatch):
    """torchrun's environment on the CPU: gloo, DDP without device_ids, device-agnostic metric sync."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        runner = build(tmp_path, max_epoch=1, find_unused_parameters=True)
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert runner.config.run_cfg.distributed and runner.config.run_cfg.dist_backend == "gloo"
        assert isinstance(runner.model, DDP) and runner.model.device_ids is None
        assert runner.model.find_unused_parameters

        meter = SmoothedValue()
        meter.update(3.0, n=2)
        meter.synchronize_between_processes()  # LAVIS's builds a CUDA tensor here
        assert (meter.count, meter.total) == (2, 6.0)

        runner.train()
        assert (runner.output_dir / "checkpoint_latest.pth").is_file()
        assert (runner.output_dir / "metrics_test.json").is_file()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_init_distributed_mode_single_process():
    run_cfg = OmegaConf.create({"device": "auto"})
    init_distributed_mode(run_cfg)
    assert run_cfg.distributed is False and run_cfg.world_size == 1
    assert run_cfg.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="run.device is 'cuda' but CUDA is not available"):
        init_distributed_mode(OmegaConf.create({"device": "cuda"}))


@pytest.mark.slow
def test_two_process_gloo_run(tmp_path):
    """torchrun --nproc_per_node=2 on the CPU: trains, syncs metrics over gloo, checkpoints, scores captions."""
    config = toy_plugin.write_toy_config(tmp_path, task="evlgen_captioning", max_epoch=1, valid_splits=[])
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(toy_plugin.REPO_ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", str(Path(toy_plugin.__file__)), "--cfg-path", str(config)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    (output_dir,) = (tmp_path / "output").iterdir()  # one job id shared by both ranks
    checkpoint = load_checkpoint(output_dir / "checkpoint_latest.pth")
    assert checkpoint["epoch"] == 0 and checkpoint["iters"] == 2  # 16 samples / (2 ranks x 4)
    torch_states = [state["torch"] for state in checkpoint["rng"]]  # one per rank, seeded run.seed + rank
    assert len(torch_states) == 2 and not torch.equal(*torch_states)
    metrics = json.loads((output_dir / "metrics_test.json").read_text())
    assert metrics["agg_metrics"] == pytest.approx(metrics["CIDEr"] + metrics["Bleu_4"])
    assert "gloo" in proc.stdout


# ---------------------------------------------------------------------- checkpoints
class Frozen(nn.Module):
    """A frozen encoder (parameters and a BatchNorm buffer) and a trainable head with its own buffer."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).requires_grad_(False)
        self.head = nn.BatchNorm1d(4)


def test_load_trainable_state_allows_missing_frozen_keys():
    source, target = Frozen(), Frozen()
    with torch.no_grad():
        source.head.weight.fill_(2.0)
        source.head.running_mean.fill_(0.5)
    state = trainable_state_dict(source)
    state = {k: v for k, v in state.items() if not k.startswith("encoder.")}  # frozen buffers omitted too
    report = load_trainable_state(target, state, source="ckpt.pth")
    assert torch.equal(target.head.weight, source.head.weight)
    assert torch.equal(target.head.running_mean, source.head.running_mean)
    assert "encoder.0.weight" in report.missing_frozen and "encoder.1.running_mean" in report.missing_frozen
    assert "head.weight" in report.loaded


def test_load_trainable_state_rejects_unexpected_keys():
    model = Frozen()
    state = {**trainable_state_dict(model), "decoder.weight": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError, match=r"ckpt\.pth: 1 keys .*'decoder.weight'"):
        load_trainable_state(model, state, source="ckpt.pth")


@pytest.mark.parametrize("dropped", ["head.weight", "head.running_var"])
def test_load_trainable_state_rejects_missing_trainable_keys(dropped):
    source, target = Frozen(), Frozen()
    with torch.no_grad():
        source.head.bias.fill_(1.0)
    state = {k: v for k, v in trainable_state_dict(source).items() if k != dropped}
    with pytest.raises(CheckpointMismatchError, match=rf"ckpt\.pth: 1 trainable keys are missing: \['{dropped}'\]"):
        load_trainable_state(target, state, source="ckpt.pth")
    assert not torch.equal(target.head.bias, source.head.bias)  # nothing was loaded


def test_load_checkpoint_is_safe_and_checks_keys(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": Frozen()}, path)  # a pickled module, not plain data
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(path)
    save_checkpoint({"model": {}}, path)
    with pytest.raises(CheckpointMismatchError, match="lacks \\['optimizer'\\]"):
        load_checkpoint(path, required=("model", "optimizer"))
