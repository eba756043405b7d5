"""Learning-rate schedules stepped per iteration (README, "Paper scale").

LAVIS's ``linear_warmup_cosine_lr`` warms up only during (inner) epoch 0 and moves its cosine once
per epoch: with the paper's 5k warmup steps (method.md §5) and COCO epochs of ~350 steps at batch
1600, the warmup never completes and the lr jumps to the cosine at epoch 1.
``linear_warmup_cosine_iter_lr`` takes the same run keys (``init_lr``, ``min_lr``, ``warmup_lr``,
``warmup_steps``) on the global step ``s = epoch * iters_per_epoch + step``: linear warmup from
``warmup_lr`` to ``init_lr`` over the first ``warmup_steps`` steps (across epochs), then a cosine
from ``init_lr`` to ``min_lr`` over the remaining steps, ``min_lr + (init_lr - min_lr) * (1 + cos(pi
* (s - warmup_steps) / (total - warmup_steps))) / 2`` with ``total = max_epoch * iters_per_epoch``:
continuous at the warmup's end. For the authors' pretraining (warmup = one inner epoch of 5k steps
of 50) it stays within 3e-6 of LAVIS's lr at every inner-epoch start, and moves every step in between.

The evlgen runners give it ``iters_per_epoch`` (the iteration runner's ``iters_per_inner_epoch``,
the epoch runner's batches per epoch); it is stateless, so a resumed run gets the same lr.
"""
from lavis.common.optims import cosine_lr_schedule, warmup_lr_schedule
from lavis.common.registry import registry


@registry.register_lr_scheduler("linear_warmup_cosine_iter_lr")
class LinearWarmupCosineIterLRScheduler:
    """Per-iteration warmup then cosine (module docstring); built by LAVIS's runner with its
    keyword arguments, ``iters_per_epoch`` set by the evlgen runners before the first step."""

    def __init__(self, optimizer, max_epoch, min_lr, init_lr, warmup_steps=0, warmup_start_lr=-1, **kwargs):
        self.optimizer = optimizer
        self.max_epoch, self.min_lr, self.init_lr = max_epoch, min_lr, init_lr
        self.warmup_steps = warmup_steps
        self.warmup_start_lr = warmup_start_lr if warmup_start_lr >= 0 else init_lr
        self.iters_per_epoch: int | None = None

    def step(self, cur_epoch: int, cur_step: int) -> None:
        """Set the optimizer's lr for step ``cur_step`` of (inner) epoch ``cur_epoch``."""
        if self.iters_per_epoch is None:
            raise RuntimeError("linear_warmup_cosine_iter_lr needs iters_per_epoch: use the runner_evlgen or "
                               "runner_evlgen_iter runner (run.runner)")
        step = cur_epoch * self.iters_per_epoch + cur_step
        if step < self.warmup_steps:
            warmup_lr_schedule(self.optimizer, step, self.warmup_steps, self.warmup_start_lr, self.init_lr)
        else:
            total = self.max_epoch * self.iters_per_epoch
            cosine_lr_schedule(self.optimizer, step - self.warmup_steps, max(total - self.warmup_steps, 1),
                               self.init_lr, self.min_lr)

