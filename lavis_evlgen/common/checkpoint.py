"""Training checkpoints that hold only what training changes.

LAVIS saves the trainable weights alone (the frozen ViT and LLM would be gigabytes) and then
reloads them with a strict ``load_state_dict`` that fails, or falls back to ``strict=False``
and silently ignores every mismatch. ``load_trainable_state`` loads non-strictly but checks the
keys itself: a missing key is allowed only when the model would keep its own value anyway
(a frozen parameter, or a buffer of a module with nothing to train), or when it belongs to a
group of trainable keys the model declares may start fresh (``StrictCheckpointLoading.fresh_key_groups``:
EVLGen-video's temporal modules, absent from an image checkpoint) and the checkpoint lacks the
whole group; those are named in the log line. Everything else is an error that names the file.

A checkpoint is ``{"model", "optimizer", "scaler", "epoch", "iters", "config", ...}``, written
atomically and read back with ``torch.load(weights_only=True)`` (no arbitrary unpickling).
"""
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys do not fit the model."""


@dataclass(repr=False)
class LoadReport:
    """What ``load_trainable_state`` did: the keys it loaded from ``source``, the frozen ones the
    model kept, and the trainable ones it kept as initialised (``fresh``: group description ->
    keys, the groups of ``may_start_fresh`` the checkpoint lacked)."""

    source: str
    loaded: list[str]
    missing_frozen: list[str]
    fresh: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        line = f"{self.source}: {len(self.loaded)} tensors loaded, {len(self.missing_frozen)} frozen tensors kept from the model"
        for reason, keys in self.fresh.items():
            line += f"; {len(keys)} new tensors initialised by the model ({reason}): {', '.join(keys)}"
        return line

    def __repr__(self) -> str:
        # A REPL echoes what model.load_checkpoint(path) returns: one line, not every key name.
        return f"LoadReport({self.summary()})"


def frozen_keys(model: nn.Module) -> set[str]:
    """State-dict keys a checkpoint may omit: parameters with requires_grad False, and buffers
    of modules that have no trainable parameter (their values never change in training).
    Tied weights (an LM head sharing the embedding) appear under every name they have."""
    keys = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    for module_name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters()):
            continue
        prefix = f"{module_name}." if module_name else ""
        keys.update(prefix + name for name, _ in module.named_buffers(recurse=False))
    return keys & set(model.state_dict())


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without its frozen parameters (LAVIS's rule: buffers are kept)."""
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str,
    may_start_fresh: dict[str, set[str]] | None = None,
) -> LoadReport:
    """Load a trainable-weights-only ``state_dict`` into ``model``, checking keys first.

    Args:
        may_start_fresh: {description: keys}: groups of trainable keys the checkpoint may lack,
            each only as a whole (all of the group missing: the model keeps its initial values and
            the report names them under the description; some of it missing: an error).
    Raises CheckpointMismatchError (naming ``source``, the file) for keys the model does not have,
    or for missing keys that are not frozen (nor a whole fresh group); nothing is loaded then.
    """
    expected = set(model.state_dict())
    unexpected = sorted(set(state_dict) - expected)
    if unexpected:
        raise CheckpointMismatchError(
            f"{source}: {len(unexpected)} keys the model ({type(model).__name__}) does not have: {unexpected}"
        )
    missing = expected - set(state_dict)
    missing_trainable = missing - frozen_keys(model)
    fresh = {}
    for reason, keys in (may_start_fresh or {}).items():
        keys = set(keys) & expected
        if keys and keys <= missing_trainable:
            fresh[reason] = sorted(keys)
            missing_trainable -= keys
    if missing_trainable:
        raise CheckpointMismatchError(
            f"{source}: {len(missing_trainable)} trainable keys are missing: {sorted(missing_trainable)}"
        )
    model.load_state_dict(state_dict, strict=False)
    new = {k for keys in fresh.values() for k in keys}
    report = LoadReport(source=source, loaded=sorted(state_dict), missing_frozen=sorted(missing - new), fresh=fresh)
    logging.info("Loaded checkpoint %s.", report.summary())
    return report


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """Write ``checkpoint`` to ``path`` atomically: a kill leaves the old file or the new one,
    never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ("model",)) -> dict:
    """Read a checkpoint onto the CPU with safe unpickling; ``required`` keys must be present."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    absent = [k for k in required if k not in checkpoint]
    if absent:
        raise CheckpointMismatchError(f"{path}: checkpoint lacks {absent} (has {sorted(checkpoint)})")
    return checkpoint


def read_model_state(url_or_filename: str) -> dict[str, torch.Tensor]:
    """The ``"model"`` state dict of a LAVIS-style checkpoint (local path or URL), loaded safely."""
    from lavis.common.dist_utils import download_cached_file
    from lavis.common.utils import is_url

    path = download_cached_file(url_or_filename, check_hash=False, progress=True) if is_url(url_or_filename) else url_or_filename
    return load_checkpoint(path)["model"]


class StrictCheckpointLoading:
    """Mixin for LAVIS models: LAVIS's config-driven checkpoint loading, without its silent ``strict=False``."""

    def load_checkpoint_from_config(self, cfg, **kwargs):
        """Load ``finetuned`` (if load_finetuned) or ``pretrained`` (if load_pretrained) weights."""
        for flag, key in (("load_finetuned", "finetuned"), ("load_pretrained", "pretrained")):
            if cfg.get(flag, False):
                if not cfg.get(key):
                    raise KeyError(f"model config sets {flag}: True but gives no '{key}' checkpoint path")
                self.load_checkpoint(cfg[key])
                return

    def fresh_key_groups(self) -> dict[str, set[str]]:
        """Groups of trainable state-dict keys a checkpoint given to ``load_checkpoint`` may lack,
        each as a whole: {description: keys}. None here; EVLGen-video names its temporal modules,
        so an image checkpoint loads into it."""
        return {}

    def load_checkpoint(self, url_or_filename: str) -> LoadReport:
        """Load a checkpoint ``{"model": state_dict, ...}`` holding the trainable weights.

        Missing keys are allowed only for frozen parts and for whole ``fresh_key_groups`` (named
        in the log line); unexpected keys are an error.
        """
        return load_trainable_state(
            self, read_model_state(url_or_filename), source=str(url_or_filename), may_start_fresh=self.fresh_key_groups()
        )
