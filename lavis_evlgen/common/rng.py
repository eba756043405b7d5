"""The random number generators' states, in a form ``torch.load(weights_only=True)`` reads back.

A training checkpoint holds one state per rank (``gather_rng_states``), so a resumed run draws
the same dropout masks and augmentations as the straight run would have.
"""
import logging
import random

import numpy as np
import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, get_world_size, is_dist_avail_and_initialized


def capture_rng_state(cuda: bool) -> dict:
    """Python's, NumPy's, torch's CPU and (``cuda``) the current CUDA device's generator states.

    NumPy's key (624 uint32) is stored as an int64 tensor: numpy arrays are not plain data
    to ``weights_only`` loading."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if cuda else None,
    }


def restore_rng_state(state: dict, cuda: bool) -> None:
    """Set every generator ``capture_rng_state`` read; the CUDA one only when ``cuda`` and saved."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if cuda and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(cuda: bool) -> list[dict]:
    """Every rank's ``capture_rng_state``, indexed by rank, on every rank (a collective)."""
    state = capture_rng_state(cuda)
    if not is_dist_avail_and_initialized():
        return [state]
    states = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rank_rng_state(states: list[dict] | None, source: str, cuda: bool) -> bool:
    """Restore this rank's entry of ``states`` (from ``gather_rng_states``). Returns False, with
    a warning naming ``source``, when there is none for this run's world size."""
    if not states:
        logging.warning("%s holds no RNG state: the resumed run draws different random numbers than the straight run.", source)
        return False
    if len(states) != get_world_size():
        logging.warning("%s holds RNG states for %d ranks, this run has %d: the RNGs are not restored, "
                        "the resumed run draws different random numbers than the straight run.",
                        source, len(states), get_world_size())
        return False
    restore_rng_state(states[get_rank()], cuda)
    return True


def loader_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of a train loader's own generator for one data epoch: DataLoader draws its
    workers' base seed from it, not from torch's global generator, so building or restarting
    a loader changes no other random draw and the workers' seeds are a function of the epoch."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
