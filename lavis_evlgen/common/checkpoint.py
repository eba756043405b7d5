"""Training checkpoints that hold only what training changes.

LAVIS saves the trainable weights alone (the frozen ViT and LLM would be gigabytes) and then
reloads them with a strict ``load_state_dict`` that fails, or falls back to ``strict=False``
and silently ignores every mismatch. ``load_trainable_state`` loads non-strictly but checks the
keys itself: a missing key is allowed only when the model would keep its own value anyway
(a frozen parameter, or a buffer of a module with nothing to train), or when it belongs to a
group of trainable keys the model declares may start fresh (``StrictCheckpointLoading.fresh_key_groups``:
EVLGen-video's temporal modules, absent from an image checkpoint) and the checkpoint lacks the
whole group; those are named in the log line. Everything else is an error that names the file.
Every key and shape is checked before the first tensor is copied: a checkpoint that does not fit
leaves the model untouched.

A checkpoint is ``{"model", "arch", "model_type", "optimizer", "scaler", "epoch", "iters",
"config", "rng", ...}``. ``arch`` and ``model_type`` name the model that wrote it: a model of
another arch or type refuses it unless its config sets ``allow_other_model_checkpoint: True``.
Saving is atomic (a temporary file renamed over the old one; the temporary file is removed when
the save fails or is terminated) and refuses non-finite weights; loading uses
``torch.load(weights_only=True)`` (no arbitrary unpickling) and names the file when it cannot be read.

A checkpoint in another project's key layout (the EVLGen authors' ``liptome_*`` models) is
translated by the model first (``StrictCheckpointLoading.foreign_layout``): keys renamed to the
model's, tensors known to be unused dropped by name and counted in the log line, the arch it
corresponds to recorded; then every check above applies to the translated checkpoint.
"""
import logging
import os
import re
import signal
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# The model-config key that lets a model load a checkpoint written by another arch or model type.
ALLOW_OTHER_MODEL_KEY = "allow_other_model_checkpoint"
# Temporary files of save_checkpoint: "<target>.<host>.<pid>.tmp" (the pid tells a stale one).
TMP_NAME = re.compile(r"^(?P<target>.+\.pth)\.(?P<host>.+)\.(?P<pid>\d+)\.tmp$")
NUMBERED_CHECKPOINT = re.compile(r"^checkpoint_(?P<position>\d+)\.pth$")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model: its keys, shapes, or the model that wrote it."""


class CheckpointReadError(RuntimeError):
    """A checkpoint file cannot be read (empty, truncated, not a torch checkpoint)."""


class NonFiniteCheckpointError(FloatingPointError):
    """A checkpoint about to be saved holds non-finite weights."""


@dataclass
class ForeignLayout:
    """A checkpoint of another project's key layout, translated to the model's names.

    ``checkpoint``: the checkpoint with its ``"model"`` state dict renamed (and the known-unused
    tensors left out), and ``arch``/``model_type`` set to the model of ours it corresponds to (None:
    the checkpoint does not say). ``dropped``: reason -> the checkpoint's own names of the tensors
    left out. ``original_names``: model key -> the checkpoint's key, for error messages.
    """

    name: str
    checkpoint: dict
    dropped: dict[str, list[str]] = field(default_factory=dict)
    original_names: dict[str, str] = field(default_factory=dict)


@dataclass(repr=False)
class LoadReport:
    """What ``load_trainable_state`` did: the keys it loaded from ``source``, the frozen ones the
    model kept, and the trainable ones it kept as initialised (``fresh``: group description ->
    keys, the groups of ``may_start_fresh`` the checkpoint lacked). A checkpoint of a foreign
    layout also names it (``layout``) and the unused tensors dropped by name (``dropped``: reason
    -> keys, counted in the summary)."""

    source: str
    loaded: list[str]
    missing_frozen: list[str]
    fresh: dict[str, list[str]] = field(default_factory=dict)
    layout: str | None = None
    dropped: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        line = f"{self.source}: {len(self.loaded)} tensors loaded, {len(self.missing_frozen)} frozen tensors kept from the model"
        for reason, keys in self.fresh.items():
            line += f"; {len(keys)} new tensors initialised by the model ({reason}): {', '.join(keys)}"
        if self.layout is not None:
            dropped = sum(len(keys) for keys in self.dropped.values())
            line += f"; {self.layout}, {dropped} unused tensors dropped"
            if self.dropped:
                line += " (" + ", ".join(f"{reason}: {len(keys)}" for reason, keys in self.dropped.items()) + ")"
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


def _named(key: str, original_names: dict[str, str] | None) -> str:
    """``key``, with the checkpoint's own name beside it when a foreign layout renamed it."""
    original = (original_names or {}).get(key)
    return key if original is None or original == key else f"{key} (checkpoint: {original})"


def check_shapes(own: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], source: str,
                 original_names: dict[str, str] | None = None) -> None:
    """Raise CheckpointMismatchError naming ``source`` and every key of ``state_dict`` whose
    shape differs from the one in ``own`` (the model's state dict; keys it lacks are skipped)."""
    wrong = [f"{_named(k, original_names)}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
             for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise CheckpointMismatchError(f"{source}: {len(wrong)} tensors have another shape than the model's: {wrong}")


def load_trainable_state(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str,
    may_start_fresh: dict[str, set[str]] | None = None,
    layout: ForeignLayout | None = None,
) -> LoadReport:
    """Load a trainable-weights-only ``state_dict`` into ``model``, checking keys first.

    Args:
        may_start_fresh: {description: keys}: groups of trainable keys the checkpoint may lack,
            each only as a whole (all of the group missing: the model keeps its initial values and
            the report names them under the description; some of it missing: an error).
        layout: the foreign layout ``state_dict`` was translated from: errors give each key's
            original name beside the model's, and the report names the layout and what it dropped.
    Raises CheckpointMismatchError (naming ``source``, the file) for keys the model does not have,
    tensors whose shape differs from the model's, or missing keys that are not frozen (nor a
    whole fresh group); all are checked before anything is loaded, so the model is untouched then.
    """
    original_names = layout.original_names if layout is not None else None
    expected = set(model.state_dict())
    unexpected = sorted(set(state_dict) - expected)
    if unexpected:
        raise CheckpointMismatchError(
            f"{source}: {len(unexpected)} keys the model ({type(model).__name__}) does not have: "
            f"{[_named(k, original_names) for k in unexpected]}"
        )
    check_shapes(model.state_dict(), state_dict, source, original_names)
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
    report = LoadReport(source=source, loaded=sorted(state_dict), missing_frozen=sorted(missing - new), fresh=fresh,
                        layout=layout.name if layout is not None else None,
                        dropped=dict(layout.dropped) if layout is not None else {})
    logging.info("Loaded checkpoint %s.", report.summary())
    return report


def non_finite_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors of ``state_dict`` that hold a NaN or an infinity."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]


class _Terminated(BaseException):
    """SIGTERM arrived during a save (raised so that the save's cleanup runs)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _sigterm_runs_cleanup():
    """Within: SIGTERM (what torchrun and schedulers send first) raises instead of killing the
    process outright, so ``finally`` blocks run; the signal is then delivered again to the
    previous handler. Only the main thread can set handlers; an ignored SIGTERM stays ignored."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return

    def handler(signum, frame):
        raise _Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated as terminated:
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(terminated.signum)  # the default handler ends the process here
        raise InterruptedError(f"interrupted by signal {terminated.signum}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files ``save_checkpoint`` left in ``directory`` when its process was
    killed outright (SIGKILL): those of this host whose process is gone. Returns them."""
    removed = []
    for tmp in Path(directory).glob("*.tmp"):
        match = TMP_NAME.match(tmp.name)
        if match and match["host"] == socket.gethostname() and not _pid_alive(int(match["pid"])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        logging.info("Removed %d stale temporary checkpoint file(s): %s", len(removed), [str(t) for t in removed])
    return removed


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> None:
    """Write ``checkpoint`` to ``path`` atomically: a kill leaves the old file or the new one,
    never half of one.

    The data go to ``<path>.<host>.<pid>.tmp``, renamed over ``path`` when complete. The
    temporary file is removed when the save fails or is interrupted (exception, Ctrl-C, SIGTERM);
    one left by SIGKILL is removed by the next save into the directory
    (``remove_stale_temporaries``). Raises NonFiniteCheckpointError, writing nothing, when
    ``checkpoint["model"]`` holds a NaN or an infinity.
    """
    path = Path(path)
    bad = non_finite_keys(checkpoint.get("model", {}))
    if bad:
        raise NonFiniteCheckpointError(f"not saving {path}: {len(bad)} tensors are not finite: {bad[:8]}")
    remove_stale_temporaries(path.parent)
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with _sigterm_runs_cleanup():
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` latest numbered checkpoints (``checkpoint_<position>.pth``)
    of ``directory``; ``checkpoint_latest.pth`` and ``checkpoint_best.pth`` are not numbered.
    Returns the deleted files."""
    numbered = sorted(
        (int(m["position"]), p) for p in Path(directory).glob("checkpoint_*.pth") if (m := NUMBERED_CHECKPOINT.match(p.name))
    )
    deleted = [p for _, p in numbered[: max(len(numbered) - keep, 0)]]
    for p in deleted:
        p.unlink(missing_ok=True)
    return deleted


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ("model",)) -> dict:
    """Read a checkpoint onto the CPU with safe unpickling; ``required`` keys must be present.

    Raises FileNotFoundError, CheckpointReadError (empty, truncated or not a torch file, or
    refused by safe unpickling) or CheckpointMismatchError, each naming ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointReadError(f"checkpoint {path} is empty (0 bytes): a save that never completed?")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... by the damage
        raise CheckpointReadError(f"checkpoint {path} ({size} bytes) cannot be read: {type(e).__name__}: {e}") from e
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    absent = [k for k in required if k not in checkpoint]
    if absent:
        raise CheckpointMismatchError(f"{path}: checkpoint lacks {absent} (has {sorted(checkpoint)})")
    return checkpoint


def read_checkpoint(url_or_filename: str) -> dict:
    """A LAVIS-style checkpoint (local path or URL) with a ``"model"`` state dict, loaded safely."""
    from lavis.common.dist_utils import download_cached_file
    from lavis.common.utils import is_url

    path = download_cached_file(url_or_filename, check_hash=False, progress=True) if is_url(url_or_filename) else url_or_filename
    return load_checkpoint(path)


def read_model_state(url_or_filename: str) -> dict[str, torch.Tensor]:
    """The ``"model"`` state dict of a LAVIS-style checkpoint (local path or URL), loaded safely."""
    return read_checkpoint(url_or_filename)["model"]


def checkpoint_model(checkpoint: dict) -> tuple[str | None, str | None]:
    """(arch, model_type) of the model that wrote ``checkpoint``: its own keys, else those of the
    run config it carries (checkpoints written before it recorded them); None where unknown."""
    model_cfg = (checkpoint.get("config") or {}).get("model") or {}
    return checkpoint.get("arch", model_cfg.get("arch")), checkpoint.get("model_type", model_cfg.get("model_type"))


def check_checkpoint_model(checkpoint: dict, arch: str | None, model_type: str | None, source: str, allow_other: bool,
                           fitting_archs: tuple[str, ...] = ()) -> None:
    """Refuse a checkpoint written by another (arch, model_type) than the one loading it (None:
    unknown on either side, not compared), unless ``allow_other`` (then a warning). A checkpoint
    of one of ``fitting_archs`` (with the same model type) is the model's own kind."""
    written = checkpoint_model(checkpoint)
    differs = [f"{name} {theirs!r} (this model: {ours!r})"
               for name, theirs, ours in zip(("arch", "model_type"), written, (arch, model_type))
               if theirs is not None and ours is not None and theirs != ours
               and not (name == "arch" and theirs in fitting_archs)]
    if not differs:
        return
    message = f"{source} was written by another model: {', '.join(differs)}"
    if not allow_other:
        raise CheckpointMismatchError(f"{message}; set model.{ALLOW_OTHER_MODEL_KEY}: True to load it anyway")
    logging.warning("%s; loading it anyway (model.%s).", message, ALLOW_OTHER_MODEL_KEY)


def allows_other_model(model_cfg) -> bool:
    """The model config's ``allow_other_model_checkpoint`` (default False)."""
    return bool(model_cfg.get(ALLOW_OTHER_MODEL_KEY, False))


def registered_arch(model: nn.Module) -> str | None:
    """The name ``model``'s class is registered under in LAVIS's registry (None: not registered)."""
    from lavis.common.registry import registry  # lazily: saving and loading need no LAVIS import

    names = [name for name, cls in registry.mapping["model_name_mapping"].items() if cls is type(model)]
    return names[0] if len(names) == 1 else None


class StrictCheckpointLoading:
    """Mixin for LAVIS models: LAVIS's config-driven checkpoint loading, without its silent
    ``strict=False``, refusing checkpoints of another arch or model type.

    ``load_checkpoint_from_config`` (called by ``from_config``) records the config's ``arch``,
    ``model_type`` and ``allow_other_model_checkpoint`` (default False) for every later load."""

    def load_checkpoint_from_config(self, cfg, **kwargs):
        """Load ``finetuned`` (if load_finetuned) or ``pretrained`` (if load_pretrained) weights."""
        self._checkpoint_model = (cfg.get("arch"), cfg.get("model_type"))
        self._allow_other_model_checkpoint = allows_other_model(cfg)
        for flag, key in (("load_finetuned", "finetuned"), ("load_pretrained", "pretrained")):
            if cfg.get(flag, False):
                if not cfg.get(key):
                    raise KeyError(f"model config sets {flag}: True but gives no '{key}' checkpoint path")
                self.load_checkpoint(cfg[key])
                return

    def foreign_layout(self, checkpoint: dict) -> ForeignLayout | None:
        """``checkpoint`` translated from another project's key layout, or None when it is in the
        model's own. None here; EVLGen reads the authors' ``liptome_*`` checkpoints."""
        return None

    def fitting_archs(self) -> tuple[str, ...]:
        """Archs besides the model's own whose checkpoints ``load_checkpoint`` takes without
        ``allow_other_model_checkpoint``. None here; EVLGen-video takes its image model's."""
        return ()

    def fresh_key_groups(self) -> dict[str, set[str]]:
        """Groups of trainable state-dict keys a checkpoint given to ``load_checkpoint`` may lack,
        each as a whole: {description: keys}. None here; EVLGen-video names its temporal modules,
        so an image checkpoint loads into it."""
        return {}

    def load_checkpoint(self, url_or_filename: str, allow_other_model: bool | None = None) -> LoadReport:
        """Load a checkpoint ``{"model": state_dict, "arch", "model_type", ...}`` holding the trainable weights.

        A checkpoint of another arch or model type is refused unless ``allow_other_model`` (None:
        the config's ``allow_other_model_checkpoint``). Missing keys are allowed only for frozen
        parts and for whole ``fresh_key_groups`` (named in the log line); unexpected keys and
        other shapes are an error, raised before anything is loaded. A checkpoint of a foreign
        layout (``foreign_layout``) is translated first and then checked the same way.
        """
        arch, model_type = getattr(self, "_checkpoint_model", (None, None))
        if allow_other_model is None:
            allow_other_model = getattr(self, "_allow_other_model_checkpoint", False)
        checkpoint = read_checkpoint(url_or_filename)
        layout = self.foreign_layout(checkpoint)
        if layout is not None:
            checkpoint = layout.checkpoint
        check_checkpoint_model(checkpoint, arch or registered_arch(self), model_type, str(url_or_filename), allow_other_model,
                               self.fitting_archs())
        return load_trainable_state(
            self, checkpoint["model"], source=str(url_or_filename), may_start_fresh=self.fresh_key_groups(),
            layout=layout,
        )
