"""Train (and evaluate) with a LAVIS config, as LAVIS's train.py, on the CPU or on GPUs.

    python train.py --cfg-path CONFIG.yaml [--options run.max_epoch=1 ...]
    python -m torch.distributed.run --nproc_per_node=N train.py --cfg-path CONFIG.yaml

The runner is ``run.runner`` (default ``runner_evlgen``); ``run.device: auto`` picks CUDA when
available.
"""
import argparse
import random
import time
from urllib.error import URLError

import lavis_evlgen  # noqa: F401  (first: registers the plugin, quiets LAVIS's import-time warnings)
import lavis.tasks as tasks
import numpy as np
import torch
import torch.backends.cudnn as cudnn
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, is_dist_avail_and_initialized, is_main_process
from lavis.common.logger import setup_logger
from lavis.common.registry import registry

from lavis_evlgen.common.run_config import DEFAULT_RUNNER, RunConfig
from lavis_evlgen.datasets.data_check import write_data_check
from lavis_evlgen.datasets.paper_data import annotation_download_error, check_dataset_files
from lavis_evlgen.datasets.feature_cache import attach_feature_cache
from lavis_evlgen.runners import init_distributed_mode


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg-path", required=True, help="path to the configuration file")
    parser.add_argument("--options", nargs="+", help="overrides of the config, as key=value")
    return parser.parse_args(argv)


def setup_seeds(cfg) -> None:
    """Seed every RNG with run.seed + rank (each process draws different augmentations)."""
    seed = int(cfg.run_cfg.seed) + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    cudnn.benchmark = False
    cudnn.deterministic = True


def shared_job_id() -> str:
    """A timestamp naming the run's output folder, rank 0's on every process (LAVIS's ``now()``
    has 10-minute resolution: two runs in that time would share a folder)."""
    job_id = [time.strftime("%Y%m%d%H%M%S")]
    if is_dist_avail_and_initialized():
        dist.broadcast_object_list(job_id, src=0)
    return job_id[0]


def build_test_splits(task, cfg) -> dict:
    """The datasets of ``run.test_splits`` only, keyed like ``task.build_datasets``: what evaluation runs on.

    LAVIS's builders build the splits listed under ``build_info.annotations``, so the others are
    dropped from the config first (nothing of theirs is downloaded or read). Builders that set
    their splits themselves (the shapes world's) still return all of them: the rest are dropped
    before any loader is made.
    """
    splits = list(cfg.run_cfg.get("test_splits", []))
    for dataset_cfg in cfg.datasets_cfg.values():
        annotations = dataset_cfg.get("build_info", {}).get("annotations")
        if annotations is not None:
            dataset_cfg.build_info.annotations = {split: ann for split, ann in annotations.items() if split in splits}
    datasets = {
        name: {split: dataset for split, dataset in built.items() if split in splits}
        for name, built in task.build_datasets(cfg).items()
    }
    absent = [split for split in splits if not any(split in built for built in datasets.values())]
    if absent:
        raise KeyError(f"run.test_splits: no dataset in the config has the split(s) {absent}")
    return datasets


def build_runner(argv=None, test_splits_only: bool = False):
    """Config, distributed setup, seeds, logging, task, datasets, model -> the configured runner.

    With ``run.feature_cache: True`` the datasets yield the frozen ViT's cached tokens and the model
    reads them (``lavis_evlgen/datasets/feature_cache.py``; ``run.feature_cache_dir`` moves the cache).

    ``test_splits_only`` builds only the datasets of ``run.test_splits`` (see ``build_test_splits``).
    """
    cfg = RunConfig(parse_args(argv))  # names and image sizes checked before anything is built
    init_distributed_mode(cfg.run_cfg)
    setup_seeds(cfg)
    setup_logger()  # after the distributed setup: only rank 0 logs at INFO
    cfg.pretty_print()

    task = tasks.setup_task(cfg)
    check_dataset_files(cfg.datasets_cfg)  # absent images or shards: one message naming them and the remedy
    try:
        datasets = build_test_splits(task, cfg) if test_splits_only else task.build_datasets(cfg)
    except URLError as error:  # LAVIS downloads absent annotation files
        raise annotation_download_error(cfg.datasets_cfg, error) or error
    model = task.build_model(cfg)
    if cfg.run_cfg.get("feature_cache", False):
        datasets = attach_feature_cache(model, datasets, cfg.run_cfg.get("feature_cache_dir"))

    runner_cls = registry.get_runner_class(cfg.run_cfg.get("runner", DEFAULT_RUNNER))  # checked by RunConfig
    runner = runner_cls(cfg=cfg, job_id=shared_job_id(), task=task, model=model, datasets=datasets)
    if is_main_process():
        write_data_check(datasets, runner.output_dir)
    return runner


def main(argv=None):
    build_runner(argv).train()


if __name__ == "__main__":
    main()
