"""torch.distributed setup that works on CPU (gloo) as well as on CUDA (nccl).

LAVIS's ``dist_utils.init_distributed_mode`` always picks nccl and calls
``torch.cuda.set_device``, and its ``SmoothedValue.synchronize_between_processes`` (called at
the end of every training epoch) builds its all-reduce tensor on CUDA; both fail on a machine
without a GPU. This module is the one place that replaces them.

It also ties every torchrun worker to its launcher (``exit_with_parent``): torchrun starts its
workers in sessions of their own, so a ``kill -9`` of the launcher's process group left them
training and writing into the run directory.
"""
import datetime
import logging
import os
import threading
import time

import torch
import torch.distributed as dist
from lavis.common import dist_utils
from lavis.common.logger import SmoothedValue


def resolve_device(name: str) -> torch.device:
    """``run.device`` -> torch.device; "auto" is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"run.device: {name!r} is not a device (use auto, cpu or cuda)") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"run.device: {name!r} is not supported (use auto, cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device is {name!r} but CUDA is not available; use run.device: auto or cpu")
    return device


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _synchronize_between_processes(meter: SmoothedValue) -> None:
    """SmoothedValue.synchronize_between_processes with its tensor on ``collective_device()``:
    sums count and total over processes (the window deque stays local, as in LAVIS)."""
    if not dist_utils.is_dist_avail_and_initialized():
        return
    t = torch.tensor([meter.count, meter.total], dtype=torch.float64, device=collective_device())
    dist.barrier()
    dist.all_reduce(t)
    meter.count, meter.total = int(t[0].item()), t[1].item()


# Seconds between a worker's looks at its parent (how long it may outlive a killed launcher).
PARENT_POLL_S = 0.5


def exit_with_parent(poll_s: float = PARENT_POLL_S) -> threading.Thread:
    """Ends this process (``os._exit``: no cleanup that could still write) within ``poll_s`` of its
    parent's death, seen as a change of ``os.getppid()`` (the orphan is re-parented).

    A daemon thread, not ``prctl(PR_SET_PDEATHSIG)``: that signal fires when the parent *thread*
    that started the child ends, which torchrun's agent does not promise to outlive its workers.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        logging.error("parent process %d is gone (launcher killed?): worker %d exits", parent, os.getpid())
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def init_distributed_mode(run_cfg) -> None:
    """Set up torch.distributed from torchrun's environment, writing the result into ``run_cfg``.

    Resolves ``run.device`` (auto -> cuda | cpu). Under ``torch.distributed.run`` (RANK,
    WORLD_SIZE, LOCAL_RANK set) exits with its launcher (``exit_with_parent``) and joins the
    process group: nccl with ``set_device(LOCAL_RANK)`` on CUDA, gloo on the CPU. Otherwise a
    single process: ``distributed`` False (``cuda:N`` selects GPU N). Sets ``device``, ``distributed``, ``rank``, ``world_size``, ``gpu`` (the local rank) and ``dist_backend``.
    ``run.dist_timeout_min`` (default 120) bounds every collective: rank 0 alone builds datasets
    and computes caption metrics while the others wait.
    """
    # LAVIS's version builds its tensor on CUDA, which gloo on a CPU-only machine cannot use.
    SmoothedValue.synchronize_between_processes = _synchronize_between_processes
    device = resolve_device(str(run_cfg.get("device", "auto")))
    # "cuda" means the current GPU, as LAVIS's .cuda() calls do: an explicit index selects it.
    run_cfg.device = device.type

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if device.index is not None:
            torch.cuda.set_device(device.index)
        run_cfg.distributed, run_cfg.rank, run_cfg.world_size = False, 0, 1
        run_cfg.gpu = torch.cuda.current_device() if device.type == "cuda" else 0
        # print, as LAVIS: logging.info here would configure the root logger before setup_logger.
        print(f"Not using distributed mode (no RANK/WORLD_SIZE in the environment); device {device}")
        return
    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError("RANK and WORLD_SIZE are set but LOCAL_RANK is not; launch with torch.distributed.run")

    exit_with_parent()
    run_cfg.rank = int(os.environ["RANK"])
    run_cfg.world_size = int(os.environ["WORLD_SIZE"])
    run_cfg.gpu = int(os.environ["LOCAL_RANK"])
    run_cfg.distributed = True
    if device.type == "cuda":
        torch.cuda.set_device(run_cfg.gpu)
        run_cfg.dist_backend = "nccl"
    else:
        run_cfg.dist_backend = "gloo"
    print(
        f"| distributed init (rank {run_cfg.rank}, world {run_cfg.world_size}, {run_cfg.dist_backend})",
        flush=True,
    )
    dist.init_process_group(
        backend=run_cfg.dist_backend,
        init_method=run_cfg.get("dist_url", "env://"),
        world_size=run_cfg.world_size,
        rank=run_cfg.rank,
        timeout=datetime.timedelta(minutes=float(run_cfg.get("dist_timeout_min", 120))),
    )
    dist.barrier()
    dist_utils.setup_for_distributed(run_cfg.rank == 0)
