"""LAVIS runners that train on the CPU (gloo) as on CUDA (nccl) and resume exactly.

``runner_evlgen`` (epoch-based RunnerBase) and ``runner_evlgen_iter`` (iteration-based
RunnerIter) share ``EvlgenRunnerMixin``, which replaces what LAVIS 1.0.2 assumes about CUDA:

- ``model``: LAVIS returns None when the model already sits on the device and gives DDP
  ``device_ids`` on the CPU; here DDP gets ``device_ids`` on CUDA only, and
  ``run.find_unused_parameters`` (default False).
- loaders: ``PrefetchLoader`` (a CUDA stream) on CUDA only. The train sampler's order, and the
  seed the train loader gives its workers, are functions of (``run.seed``, rank, epoch), so a
  resumed run sees the batches a straight run would.
- evaluation: samples move to CUDA only on CUDA (``BaseTask.evaluation`` defaults to
  ``cuda_enabled=True`` and LAVIS's runner does not pass it); progress (batches done, time
  left) is logged every ``EVAL_PROGRESS_INTERVAL_S``.
- ``run.amp``: ``torch.amp.GradScaler("cuda")`` on CUDA; off with a warning on the CPU. LAVIS's
  train loop enters ``torch.cuda.amp.autocast`` only when a scaler exists, so autocast runs on
  CUDA only.
- barriers only when torch.distributed is initialized (a plain single process has none).
- checkpoints: trainable weights, the model's arch and type, optimizer, scaler, position, best
  metric and every rank's RNG states (captured when the (inner) epoch's training ends; validation
  then draws nothing from the training's RNGs), written atomically, with
  ``checkpoint_latest.pth`` every (inner) epoch; ``run.keep_checkpoints`` bounds the numbered
  ones. ``run.resume_ckpt_path`` continues the run exactly; reloads go through
  ``load_trainable_state`` (never silently non-strict, nothing loaded unless everything fits).
- non-finite losses: the optimizer is wrapped in a ``NonFiniteGuard`` that skips such steps,
  up to ``run.max_nonfinite_steps`` in a row, then stops the run (see ``nonfinite.py``).
- ``run.max_grad_norm``: the gradients' total norm is clipped before each step (``grad_clip.py``;
  LAVIS does not clip).
- ``run.output_dir`` is relative to the working directory (LAVIS joins it to its package dir).

Importing this module also registers LAVIS's LR schedulers (they live in
``lavis.common.optims``, which nothing in LAVIS imports) and ours (``schedules.py``:
``linear_warmup_cosine_iter_lr``, warmup and cosine per iteration), and points LAVIS's ``cache_root`` at
``lavis_evlgen.common.paths.cache_root()`` (LAVIS's default is ``/export/home/.cache/lavis``).
"""
import datetime
import logging
import math
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

import lavis.common.optims  # noqa: F401  (registers linear_warmup_cosine_lr, linear_warmup_step_lr)
import torch
import torch.distributed as dist
import webdataset as wds
from lavis.common.dist_utils import (
    get_rank,
    get_world_size,
    is_dist_avail_and_initialized,
    is_main_process,
    main_process,
)
from lavis.common.registry import registry
from lavis.datasets.datasets.dataloader_utils import MultiIterLoader, PrefetchLoader
from lavis.runners.runner_base import RunnerBase
from lavis.runners.runner_iter import RunnerIter
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.data.dataset import ChainDataset

from lavis_evlgen.common.checkpoint import (
    allows_other_model,
    check_checkpoint_model,
    load_checkpoint,
    load_trainable_state,
    prune_checkpoints,
    remove_stale_temporaries,
    save_checkpoint,
    trainable_state_dict,
)
from lavis_evlgen.common.paths import cache_root
from lavis_evlgen.common.rng import gather_rng_states, loader_seed, restore_rank_rng_state, restore_rng_state
from lavis_evlgen.runners.distributed import resolve_device
from lavis_evlgen.runners.grad_clip import GradNormClip
from lavis_evlgen.runners.nonfinite import NonFiniteGuard
from lavis_evlgen.runners.schedules import LinearWarmupCosineIterLRScheduler

# LAVIS's dataset builders resolve relative storage paths against cache_root.
registry.mapping["paths"]["cache_root"] = str(cache_root())

# Seconds between evaluation progress lines (EvalProgress).
EVAL_PROGRESS_INTERVAL_S = 30.0


@dataclass(frozen=True)
class RunnerOptions:
    """The runners' own ``run.*`` options, with their defaults.

    max_nonfinite_steps: optimizer steps with a non-finite loss or gradient skipped in a row
        (each counted in the train stats as ``nonfinite_steps_skipped``) before the run stops;
        0 stops at the first.
    keep_checkpoints: how many numbered checkpoints (``checkpoint_<epoch | iters>.pth``, written
        when there are no valid splits) to keep, the latest; null keeps all.
        ``checkpoint_latest.pth`` and ``checkpoint_best.pth`` are always kept.
    max_grad_norm: clip the trainable gradients' total L2 norm to this before each step
        (``grad_clip.py``); null does not clip (LAVIS's behaviour).
    """

    max_nonfinite_steps: int = 0
    keep_checkpoints: int | None = None
    max_grad_norm: float | None = None

    @classmethod
    def from_run_cfg(cls, run_cfg) -> "RunnerOptions":
        """Read from the run config; a value of the wrong type or range names its key. Those
        whose default is None may be null."""
        checks = {
            "max_nonfinite_steps": (_int_at_least(0), "an integer >= 0"),
            "keep_checkpoints": (_int_at_least(1), "an integer >= 1"),
            "max_grad_norm": (_positive_number, "a number > 0"),
        }
        values = {}
        for f in fields(cls):
            value = run_cfg.get(f.name, f.default)
            nullable = f.default is None
            valid, allowed = checks[f.name]
            if not (value is None and nullable) and not valid(value):
                raise ValueError(f"run.{f.name}: expected {allowed}" + (" or null" if nullable else "") + f", got {value!r}")
            values[f.name] = value
        return cls(**values)


def _int_at_least(minimum: int):
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


class SkippingSampler(DistributedSampler):
    """A DistributedSampler (with one replica it is a seeded shuffle): its order depends only on
    (seed, epoch). ``skip`` drops the first indices of the next pass, for a run resumed mid-epoch."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return super().__len__() - self.skip


class EpochLoader:
    """An endless iterator over a map-style train loader, one pass per epoch, with
    ``sampler.set_epoch`` and the loader's ``generator`` seeded by ``loader_seed`` before each
    pass. Starts at ``start_epoch``, skipping its first ``skip_batches`` batches. ``epoch`` and
    ``len`` (batches per pass) as LAVIS's IterLoader."""

    def __init__(self, loader, sampler: SkippingSampler, generator: torch.Generator, batch_size: int,
                 start_epoch: int = 0, skip_batches: int = 0):
        self.loader, self.sampler, self.generator, self.batch_size = loader, sampler, generator, batch_size
        self.batches_per_epoch = len(loader)
        self.epoch = start_epoch
        self._batches = self._begin_epoch(skip_batches)

    def _begin_epoch(self, skip_batches: int):
        self.sampler.set_epoch(self.epoch)
        self.sampler.skip = skip_batches * self.batch_size
        self.generator.manual_seed(loader_seed(self.sampler.seed, self.sampler.rank, self.epoch))
        return iter(self.loader)

    def __next__(self):
        try:
            return next(self._batches)
        except StopIteration:
            self.epoch += 1
            self._batches = self._begin_epoch(0)
            return next(self._batches)

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return self.batches_per_epoch


class EvalProgress:
    """An evaluation loader that logs "<label>: i/N batches, elapsed, ~left" at most every
    ``interval_s`` seconds.

    LAVIS's evaluation loop (MetricLogger) prints only every 10th batch and the last, so a split of
    a few slow batches (beam search on the CPU) shows nothing for minutes. Lines go through
    ``logging``, which LAVIS's ``setup_logger`` keeps at WARNING on all processes but the main one.
    """

    def __init__(self, loader, label: str, interval_s: float):
        self.loader, self.label, self.interval_s = loader, label, interval_s

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        total = len(self.loader)
        start = last = time.monotonic()
        for done, batch in enumerate(self.loader, start=1):
            yield batch  # returns once the evaluation loop has processed it
            now = time.monotonic()
            if now - last >= self.interval_s and done < total:
                elapsed = now - start
                logging.info("%s: %d/%d batches, %.0f s, ~%.0f s left",
                             self.label, done, total, elapsed, elapsed / done * (total - done))
                last = now


class EvlgenRunnerMixin:
    """The device-agnostic, resumable parts shared by both runners (see the module docstring).

    A runner defines ``_position_key`` ("epoch" | "iters"), ``_train_position``,
    ``_position_state`` and ``_restore_position``.
    """

    _position_key: str

    def __init__(self, cfg, task, model, datasets, job_id):
        super().__init__(cfg, task, model, datasets, job_id)
        self.options = RunnerOptions.from_run_cfg(cfg.run_cfg)
        self._best = {"agg_metrics": -math.inf, "position": None}
        self._guard: NonFiniteGuard | None = None
        self._rng_states: list[dict] | None = None  # every rank's, when the last training span ended
        if cfg.run_cfg.get("amp", False) and not self.cuda_enabled:
            logging.warning("run.amp is on but the device is the CPU: training in fp32 (bf16 autocast is ~7x slower on CPU).")

    # ------------------------------------------------------------------ device and model
    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = resolve_device(str(self.config.run_cfg.get("device", "auto")))
        return self._device

    @property
    def use_distributed(self) -> bool:
        """run.distributed as set by init_distributed_mode (LAVIS configs say True by default)."""
        return bool(self.config.run_cfg.get("distributed", False)) and is_dist_avail_and_initialized()

    @property
    def model(self):
        """The model on the device, DDP-wrapped when distributed (on the CPU without device_ids)."""
        if self._wrapped_model is None:
            self._model = self._model.to(self.device)
            if self.use_distributed:
                self._wrapped_model = DDP(
                    self._model,
                    device_ids=[self.config.run_cfg.gpu] if self.cuda_enabled else None,
                    find_unused_parameters=bool(self.config.run_cfg.get("find_unused_parameters", False)),
                )
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

    @property
    def optimizer(self) -> NonFiniteGuard:
        """LAVIS's optimizer, behind a ``GradNormClip`` when ``run.max_grad_norm`` is set, behind a
        ``NonFiniteGuard`` (what the train loop and the checkpoints see)."""
        if self._guard is None:
            optimizer = super().optimizer
            if self.options.max_grad_norm is not None:
                optimizer = GradNormClip(optimizer, self.options.max_grad_norm)
            self._guard = NonFiniteGuard(
                optimizer, self.unwrap_dist_model(self.model), self.options.max_nonfinite_steps, self.device
            )
        return self._guard

    @property
    def lr_scheduler(self):
        """LAVIS's scheduler; a per-iteration one (``schedules.py``) learns the iterations per (inner) epoch."""
        scheduler = super().lr_scheduler
        if isinstance(scheduler, LinearWarmupCosineIterLRScheduler) and scheduler.iters_per_epoch is None:
            scheduler.iters_per_epoch = self._iters_per_epoch()
        return scheduler

    @property
    def scaler(self):
        if self._scaler is None and self.config.run_cfg.get("amp", False) and self.cuda_enabled:
            self._scaler = torch.amp.GradScaler("cuda")
        return self._scaler

    def setup_output_dir(self):
        output_dir = Path(self.config.run_cfg.output_dir).expanduser().resolve() / self.job_id
        result_dir = output_dir / "result"
        result_dir.mkdir(parents=True, exist_ok=True)
        # registry.register_path refuses to overwrite, which breaks a second runner in one process.
        registry.mapping["paths"]["output_dir"] = str(output_dir)
        registry.mapping["paths"]["result_dir"] = str(result_dir)
        self.output_dir, self.result_dir = output_dir, result_dir

    # ------------------------------------------------------------------ data
    def create_loaders(self, datasets, num_workers, batch_sizes, is_trains, collate_fns, dataset_ratios=None):
        """One loader per split, as LAVIS's: train loaders are endless iterators, a split holding
        several datasets gets a MultiIterLoader sampling them by ``dataset_ratios``."""
        loaders = []
        for dataset, batch_size, is_train, collate_fn in zip(datasets, batch_sizes, is_trains, collate_fns):
            if isinstance(dataset, (list, tuple)):
                if self.resume_ckpt_path is not None:
                    logging.warning("Resuming with several train datasets: their order restarts from epoch 0.")
                loader = MultiIterLoader(
                    loaders=[
                        self._create_loader(d, num_workers, batch_size, is_train, fn, resumable=False)
                        for d, fn in zip(dataset, collate_fn)
                    ],
                    ratios=dataset_ratios,
                )
            else:
                loader = self._create_loader(dataset, num_workers, batch_size, is_train, collate_fn)
            loaders.append(loader)
        return loaders

    def _create_loader(self, dataset, num_workers, batch_size, is_train, collate_fn, resumable=True):
        if isinstance(dataset, (ChainDataset, wds.DataPipeline)):
            # Streams shard, shuffle and batch themselves; they have no resumable position.
            return iter(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=self.cuda_enabled))

        generator = torch.Generator()  # the loader's own: see loader_seed
        if is_train:
            sampler = SkippingSampler(
                dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=int(self.config.run_cfg.seed)
            )
        elif self.use_distributed and self.use_dist_eval_sampler:
            sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=False)
        else:
            sampler = None
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=self.cuda_enabled,
            sampler=sampler,
            collate_fn=collate_fn,
            drop_last=is_train,
            generator=generator,
        )
        if self.cuda_enabled:
            loader = PrefetchLoader(loader)  # overlaps host-to-GPU copies on a side CUDA stream
        if not is_train:
            return loader
        start_epoch, skip_batches = self._train_position(len(loader)) if resumable else (0, 0)
        return EpochLoader(loader, sampler, generator, batch_size, start_epoch, skip_batches)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_epoch(self, split_name, cur_epoch, skip_reload=False):
        """Evaluate on ``split_name``; ``cur_epoch == "best"`` reloads checkpoint_best first
        unless ``skip_reload``. Returns the task's metrics (None on non-main processes)."""
        data_loader = self.dataloaders.get(split_name)
        if data_loader is None:
            raise KeyError(f"no data for split {split_name!r}; the datasets provide {sorted(self.dataloaders)}")
        model = self.unwrap_dist_model(self.model)
        if not skip_reload and cur_epoch == "best":
            model = self._reload_best_model(model)
        model.eval()
        self.task.before_evaluation(model=model, dataset=self.datasets[split_name])
        progress = EvalProgress(data_loader, f"Evaluating {split_name}", EVAL_PROGRESS_INTERVAL_S)
        results = self.task.evaluation(model, progress, cuda_enabled=self.cuda_enabled)
        if results is None:
            return None
        return self.task.after_evaluation(val_result=results, split_name=split_name, epoch=cur_epoch)

    def _validate(self, cur_epoch, position: int) -> None:
        """Evaluate every valid split; an improved "val" agg_metrics saves checkpoint_best."""
        for split_name in self.valid_splits:
            logging.info("Evaluating on %s.", split_name)
            val_log = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch)
            if val_log is None or not is_main_process():
                continue
            if "agg_metrics" not in val_log:
                raise KeyError(f"task {type(self.task).__name__} returned no agg_metrics for split {split_name!r}")
            improved = val_log["agg_metrics"] > self._best["agg_metrics"]
            if split_name == "val" and improved and not self.evaluate_only:
                self._best = {"agg_metrics": val_log["agg_metrics"], "position": position}
                self._save_checkpoint(position, is_best=True)
            position_stats = {self._position_key: position, f"best_{self._position_key}": self._best["position"]}
            self.log_stats({**val_log, **position_stats}, split_name)

    # ------------------------------------------------------------------ training spans
    def _end_training_span(self, stats: dict) -> dict:
        """After an (inner) epoch's training, on every rank: note every rank's RNG states (what the
        checkpoints of this position carry) and the skipped non-finite steps (into ``stats``)."""
        self._rng_states = gather_rng_states(self.cuda_enabled)
        stats["nonfinite_steps_skipped"] = self.optimizer.pop_skipped()
        return stats

    def _rewind_rng(self) -> None:
        """Back to the RNG states of the end of training: validation leaves no trace on the
        training's random draws, so a run resumed from this position draws what this one will."""
        if self._rng_states is not None:
            restore_rng_state(self._rng_states[get_rank()], self.cuda_enabled)

    # ------------------------------------------------------------------ checkpoints
    @main_process
    def _save_checkpoint(self, position: int, is_best: bool = False, latest: bool = False):
        """checkpoint_{best | latest | position}.pth in the output dir (main process only); a
        numbered one prunes the older ones to ``run.keep_checkpoints``."""
        name = "best" if is_best else "latest" if latest else position
        path = self.output_dir / f"checkpoint_{name}.pth"
        model_cfg = self.config.model_cfg
        checkpoint = {
            "model": trainable_state_dict(self.unwrap_dist_model(self.model)),
            "arch": model_cfg.get("arch"),
            "model_type": model_cfg.get("model_type"),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": self.config.to_dict(),
            "best": dict(self._best),
            "rng": self._rng_states,
            **self._position_state(position),
        }
        save_checkpoint(checkpoint, path)
        logging.info("Saved %s (%s %d).", path, self._position_key, position)
        if name == position and self.options.keep_checkpoints is not None:
            for old in prune_checkpoints(self.output_dir, self.options.keep_checkpoints):
                logging.info("Deleted %s (run.keep_checkpoints=%d).", old, self.options.keep_checkpoints)

    def _load_checkpoint(self, url_or_filename):
        """Resume: trainable weights, optimizer, scaler, best metric, RNG states and position,
        from a checkpoint of the same arch and model type (unless model.allow_other_model_checkpoint)."""
        source = str(url_or_filename)
        remove_stale_temporaries(Path(url_or_filename).parent)
        checkpoint = load_checkpoint(url_or_filename, required=("model", "optimizer", self._position_key))
        model_cfg = self.config.model_cfg
        check_checkpoint_model(checkpoint, model_cfg.get("arch"), model_cfg.get("model_type"), source, allows_other_model(model_cfg))
        load_trainable_state(self.unwrap_dist_model(self.model), checkpoint["model"], source=source)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler is not None and checkpoint.get("scaler") is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self._best = checkpoint.get("best", self._best)
        # The best checkpoint so far belongs to the run being continued: bring it along, so the
        # test phase can reload it even when no later validation beats it.
        source_best = Path(url_or_filename).parent / "checkpoint_best.pth"
        if is_main_process() and source_best.is_file() and source_best.resolve() != (self.output_dir / "checkpoint_best.pth").resolve():
            shutil.copy2(source_best, self.output_dir / "checkpoint_best.pth")
        self._rng_states = checkpoint.get("rng")
        restore_rank_rng_state(self._rng_states, source, self.cuda_enabled)
        self._restore_position(checkpoint)
        logging.info("Resumed from %s after %s %d.", url_or_filename, self._position_key, checkpoint[self._position_key])

    def _reload_best_model(self, model):
        path = self.output_dir / "checkpoint_best.pth"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: only a split named 'val' in run.valid_splits saves it")
        load_trainable_state(model, load_checkpoint(path)["model"], source=str(path))
        return model

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _barrier() -> None:
        if is_dist_avail_and_initialized():
            dist.barrier()

    def _log_throughput(self, stats: dict, steps: int, seconds: float, label: str) -> dict:
        """Log and record the training samples/s (all processes together) and seconds of one (inner) epoch."""
        samples = steps * int(self.config.run_cfg.batch_size_train) * get_world_size()
        rate = samples / max(seconds, 1e-9)
        logging.info("%s: %d samples in %.1f s, %.1f samples/s", label, samples, seconds, rate)
        stats["samples_per_s"] = f"{rate:.1f}"
        stats["seconds"] = f"{seconds:.1f}"
        return stats

    def _finish(self, start_time: float) -> None:
        logging.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))


@registry.register_runner("runner_evlgen")
class RunnerEvlgen(EvlgenRunnerMixin, RunnerBase):
    """Epoch-based: train an epoch, validate, checkpoint; then test (on the best checkpoint when
    there are valid splits)."""

    _position_key = "epoch"

    def _iters_per_epoch(self) -> int:
        return len(self.train_loader)

    def _train_position(self, batches_per_epoch: int) -> tuple[int, int]:
        return self.start_epoch, 0

    def _position_state(self, epoch: int) -> dict:
        return {"epoch": epoch, "iters": (epoch + 1) * len(self.train_loader)}

    def _restore_position(self, checkpoint: dict) -> None:
        self.start_epoch = int(checkpoint["epoch"]) + 1

    def train_epoch(self, epoch):
        start = time.time()
        stats = super().train_epoch(epoch)
        return self._log_throughput(stats, len(self.train_loader), time.time() - start, f"epoch {epoch}")

    def train(self):
        start_time = time.time()
        self.log_config()
        if not self.evaluate_only and self.resume_ckpt_path is not None:
            self._load_checkpoint(self.resume_ckpt_path)

        last_epoch = self.max_epoch - 1
        for cur_epoch in range(self.start_epoch, self.max_epoch):
            if not self.evaluate_only:
                logging.info("Start training epoch %d.", cur_epoch)
                self.log_stats(split_name="train", stats=self._end_training_span(self.train_epoch(cur_epoch)))
            self._validate(cur_epoch, position=cur_epoch)
            self._rewind_rng()
            if self.evaluate_only:
                last_epoch = cur_epoch
                break
            if not self.valid_splits:
                self._save_checkpoint(cur_epoch)
            self._save_checkpoint(cur_epoch, latest=True)
            self._barrier()

        self.evaluate(cur_epoch="best" if self.valid_splits else last_epoch, skip_reload=self.evaluate_only)
        self._finish(start_time)


@registry.register_runner("runner_evlgen_iter")
class RunnerEvlgenIter(EvlgenRunnerMixin, RunnerIter):
    """Iteration-based: every ``run.iters_per_inner_epoch`` steps validate and checkpoint, up to
    ``run.max_iters``; then test (on the best checkpoint when there are valid splits)."""

    _position_key = "iters"

    def _iters_per_epoch(self) -> int:
        return self.iters_per_inner_epoch

    def _train_position(self, batches_per_epoch: int) -> tuple[int, int]:
        return divmod(self.start_iters, batches_per_epoch)

    def _position_state(self, iters: int) -> dict:
        return {"epoch": self.cur_epoch, "iters": iters}

    def _restore_position(self, checkpoint: dict) -> None:
        self.start_iters = int(checkpoint["iters"])

    def train_iters(self, epoch, start_iters):
        start = time.time()
        stats = super().train_iters(epoch, start_iters)
        label = f"iters {start_iters}-{start_iters + self.iters_per_inner_epoch}"
        return self._log_throughput(stats, self.iters_per_inner_epoch, time.time() - start, label)

    def train(self):
        start_time = time.time()
        self.log_config()
        if not self.evaluate_only and self.resume_ckpt_path is not None:
            self._load_checkpoint(self.resume_ckpt_path)

        for start_iters in range(self.start_iters, self.max_iters, self.iters_per_inner_epoch):
            end_iters = start_iters + self.iters_per_inner_epoch
            if not self.evaluate_only:
                logging.info("Start training iters %d-%d of %d.", start_iters, end_iters, self.max_iters)
                self.log_stats(split_name="train", stats=self._end_training_span(self.train_iters(self.cur_epoch, start_iters)))
            self._validate(self._progress(end_iters), position=end_iters)
            self._rewind_rng()
            if self.evaluate_only:
                break
            if not self.valid_splits:
                self._save_checkpoint(end_iters)
            self._save_checkpoint(end_iters, latest=True)
            self._barrier()

        self.evaluate(cur_epoch="best" if self.valid_splits else self._progress(self.max_iters), skip_reload=self.evaluate_only)
        self._finish(start_time)
