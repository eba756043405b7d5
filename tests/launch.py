"""Launching train.py under torch.distributed.run from tests."""
import os
import socket

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port free on loopback now (torchrun's --master_port=0 hangs the static rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment without any torchrun variables, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, **extra}
