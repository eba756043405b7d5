"""Launching train.py under torch.distributed.run from tests (helpers shared with run_scripts/)."""
from lavis_evlgen.common.jobs import DIST_ENV, free_port, subprocess_env

__all__ = ["DIST_ENV", "free_port", "subprocess_env"]
