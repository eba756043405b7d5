"""Training and evaluation through LAVIS's runners, on the CPU (gloo) and on CUDA (nccl).

Importing this package registers the runners ``runner_evlgen`` (epoch-based) and
``runner_evlgen_iter`` (iteration-based), LAVIS's LR schedulers, and lavis_evlgen's cache root
as LAVIS's ``cache_root``.
"""
from lavis_evlgen.runners.distributed import init_distributed_mode, resolve_device
from lavis_evlgen.runners.runner_evlgen import EvlgenRunnerMixin, RunnerEvlgen, RunnerEvlgenIter

__all__ = ["EvlgenRunnerMixin", "RunnerEvlgen", "RunnerEvlgenIter", "init_distributed_mode", "resolve_device"]
