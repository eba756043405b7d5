"""Stop a run whose loss turns non-finite instead of training (and checkpointing) garbage.

LAVIS's train loop (``BaseTask._train_inner_loop``) backpropagates whatever loss the model
returns and steps the optimizer. ``NonFiniteGuard`` is handed to that loop in place of the
optimizer: it sees each training forward's loss (a forward hook on the model) and the gradients
before each step, and refuses to step on a non-finite loss or gradient. Up to
``max_consecutive`` such steps in a row are skipped and counted; the next one raises
``NonFiniteLossError`` with the step, the epoch and the sample ids of the batch. A step that
leaves a weight non-finite (finite gradients times a huge lr) raises at once: it cannot be undone.
Cost per step: a finiteness check of the loss, the gradients and the weights (a device sync each,
as LAVIS's own ``loss.item()``), and with several processes one all-reduce of a flag.

Under AMP the GradScaler skips steps with overflowing gradients itself (a normal part of loss
scaling, not counted here); a non-finite loss is counted all the same.
"""
import logging

import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, is_dist_avail_and_initialized
from torch import nn

# Sample keys that identify a training example, in the order they are reported.
SAMPLE_ID_KEYS = ("instance_id", "question_id", "image_id", "video_id")


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss, gradient or weight."""


def batch_ids(samples: dict) -> dict[str, list]:
    """{key: ids} of the ``SAMPLE_ID_KEYS`` present in a collated batch."""
    ids = {}
    for key in SAMPLE_ID_KEYS:
        if key in samples:
            value = samples[key]
            ids[key] = value.tolist() if isinstance(value, torch.Tensor) else list(value)
    return ids


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when every element of every tensor is finite (one device sync in all)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` or-ed over the processes (every rank takes the same decision)."""
    if not is_dist_avail_and_initialized():
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


class NonFiniteGuard:
    """An optimizer wrapper for LAVIS's train loop (which calls ``step`` then ``zero_grad`` every
    ``accum_grad_iters`` batches); everything else is delegated to the wrapped optimizer.

    ``step`` is skipped when a loss since the last step, or a gradient, is not finite;
    ``zero_grad`` closes the step: it counts a skipped step (all ranks agree) and raises
    ``NonFiniteLossError`` after more than ``max_consecutive`` in a row.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, max_consecutive: int, device: torch.device):
        self.optimizer, self.max_consecutive, self.device = optimizer, max_consecutive, device
        self.consecutive = 0
        self.skipped = 0  # skipped steps since the counter was last read (``pop_skipped``)
        self._bad_batch: dict | None = None  # the first batch with a non-finite loss since the last step
        self._stepped_bad = False  # step() refused (non-finite gradients)
        self._last_batch: dict = {}
        model.register_forward_hook(self._observe_loss)

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def _observe_loss(self, module: nn.Module, args: tuple, output) -> None:
        """Forward hook: note the batch of a training forward and whether its loss is finite."""
        if not module.training or not args or not isinstance(args[0], dict):
            return
        samples = args[0]
        self._last_batch = {
            "epoch": samples.get("epoch"),
            "iteration": samples.get("iters"),
            "iterations": samples.get("num_iters_per_epoch"),
            "ids": batch_ids(samples),
        }
        loss = output.get("loss") if isinstance(output, dict) else None
        if isinstance(loss, torch.Tensor) and self._bad_batch is None and not all_finite([loss.detach()]):
            self._bad_batch = {**self._last_batch, "loss": loss.detach().float().cpu().tolist()}

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, *args, **kwargs):
        grads = [p.grad for p in self._params() if p.grad is not None]
        if self._bad_batch is not None or not all_finite(grads):
            self._stepped_bad = True
            return None
        result = self.optimizer.step(*args, **kwargs)
        params = self._params()
        if not all_finite(params):
            bad_weights = [p for p in params if not torch.isfinite(p).all()]
            raise NonFiniteLossError(
                f"{len(bad_weights)} of {len(params)} trainable tensors became non-finite in the optimizer step after "
                f"{self._describe(self._last_batch)} (finite loss and gradients: the learning rate is too large?); "
                f"the run stops before any checkpoint holds them"
            )
        return result

    def zero_grad(self, *args, **kwargs):
        self.optimizer.zero_grad(*args, **kwargs)
        bad = any_rank(self._bad_batch is not None or self._stepped_bad, self.device)
        batch = self._bad_batch or self._last_batch
        loss_note = "non-finite loss" if self._bad_batch is not None else "non-finite loss or gradients (on this or another rank)"
        self._bad_batch, self._stepped_bad = None, False
        if not bad:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        where = self._describe(batch)
        if self.consecutive > self.max_consecutive:
            raise NonFiniteLossError(
                f"{loss_note} at {where}: {self.consecutive} bad step(s) in a row, more than "
                f"run.max_nonfinite_steps={self.max_consecutive}; the last checkpoint written is the last good one"
            )
        logging.warning("Skipped an optimizer step: %s at %s (%d in a row, run.max_nonfinite_steps=%d).",
                        loss_note, where, self.consecutive, self.max_consecutive)

    def pop_skipped(self) -> int:
        """Steps skipped since the last call."""
        skipped, self.skipped = self.skipped, 0
        return skipped

    @staticmethod
    def _describe(batch: dict) -> str:
        epoch, i, n = batch.get("epoch"), batch.get("iteration"), batch.get("iterations")
        step = epoch * n + i if None not in (epoch, i, n) else "?"
        loss = f", loss {batch['loss']}" if "loss" in batch else ""
        return f"step {step} (epoch {epoch}, iteration {i} of {n}; rank {get_rank()}; batch {batch.get('ids')}{loss})"
