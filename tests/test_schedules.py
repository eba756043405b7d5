"""Per-iteration warmup + cosine (lavis_evlgen/runners/schedules.py) against LAVIS's epoch-stepped one."""
import math

import pytest
import torch
from lavis.common.optims import LinearWarmupCosineLRScheduler
from lavis.common.registry import registry

import lavis_evlgen  # noqa: F401  (registers the schedule)
from lavis_evlgen.runners.schedules import LinearWarmupCosineIterLRScheduler

RECIPE = {"init_lr": 1e-4, "min_lr": 1e-5, "warmup_start_lr": 1e-6}  # method.md section 5


def _lr(scheduler, epoch: int, step: int) -> float:
    scheduler.step(cur_epoch=epoch, cur_step=step)
    return scheduler.optimizer.param_groups[0]["lr"]


def _optimizer():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)


def test_registered_under_its_config_name():
    assert registry.get_lr_scheduler_class("linear_warmup_cosine_iter_lr") is LinearWarmupCosineIterLRScheduler


def test_warmup_spans_short_epochs_where_lavis_jumps():
    # COCO at batch 1600: ~354 steps per epoch; 5000 warmup steps, 30 epochs (10,620 steps).
    ours = LinearWarmupCosineIterLRScheduler(_optimizer(), max_epoch=30, warmup_steps=5000, **RECIPE)
    ours.iters_per_epoch = 354
    lavis = LinearWarmupCosineLRScheduler(_optimizer(), max_epoch=30, warmup_steps=5000, **RECIPE)
    assert _lr(ours, 1, 0) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 354 / 5000)  # still warming up in epoch 1
    assert _lr(lavis, 1, 0) > 9e-5 > 1e-5 > _lr(lavis, 0, 353)                 # LAVIS jumps to the cosine
    assert _lr(ours, 14, 43) < _lr(ours, 14, 44) == pytest.approx(1e-4)          # global steps 4999, 5000
    assert _lr(ours, 20, 0) == pytest.approx(1e-5 + 9e-5 * (1 + math.cos(math.pi * 2080 / 5620)) / 2)
    assert _lr(ours, 29, 353) == pytest.approx(1e-5, rel=1e-3)                   # the last step ends at min_lr


def test_close_to_lavis_at_inner_epoch_starts_and_moves_between():
    # The authors' pretraining: 250k iterations in inner epochs of 5k, warmup 5k.
    ours = LinearWarmupCosineIterLRScheduler(_optimizer(), max_epoch=50, warmup_steps=5000, **RECIPE)
    ours.iters_per_epoch = 5000
    lavis = LinearWarmupCosineLRScheduler(_optimizer(), max_epoch=50, warmup_steps=5000, **RECIPE)
    for step in (0, 2500, 4999):  # the warmup: the same
        assert _lr(ours, 0, step) == pytest.approx(_lr(lavis, 0, step), rel=1e-12)
    assert max(abs(_lr(ours, epoch, 0) - _lr(lavis, epoch, 0)) for epoch in range(1, 50)) < 3e-6
    assert _lr(ours, 25, 2500) < _lr(ours, 25, 0)       # decays within an inner epoch
    assert _lr(lavis, 25, 2500) == _lr(lavis, 25, 0)    # LAVIS holds it


def test_without_iters_per_epoch_names_the_runners():
    scheduler = LinearWarmupCosineIterLRScheduler(_optimizer(), max_epoch=1, **RECIPE)
    with pytest.raises(RuntimeError, match="runner_evlgen or runner_evlgen_iter"):
        scheduler.step(cur_epoch=0, cur_step=0)
