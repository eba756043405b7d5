"""Token Merging (ToMe) math: bipartite soft matching, merge rules, source tracking, r schedules.

Same public API as facebookresearch/ToMe (`tome/merge.py`, `tome/utils.py`), written as small pure
functions so TomeFormer and the tests can share them. Shapes: B batch, T tokens, C channels.
"""

import math
from collections.abc import Sequence
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

# Reductions a merge closure accepts (torch.scatter_reduce names). "amax" is for source tracking.
MERGE_REDUCTIONS = ("mean", "sum", "amax")

RSchedule = Union[int, Sequence, Tuple[int, float]]


def _identity(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    return x


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    class_token: bool = True,
    distill_token: bool = False,
) -> Tuple[Callable, Callable]:
    """Match tokens into pairs and return closures that merge / unmerge r of them.

    metric: [B, T, Ck] similarity features (TomeFormer uses the attention keys averaged over heads).
    Tokens alternate into set A (even positions) and set B (odd positions); each A token keeps its
    most cosine-similar B token and the r best-matched A tokens are merged into their B match.
    The CLS token (position 0) and, with distill_token, the token at position 1 are never merged.

    Returns (merge, unmerge):
      merge(x [B, T, C], mode="mean") -> [B, T - r, C], ordered [unmerged A tokens, B tokens]
        with protected tokens first. "mean" is the plain mean of each group (the paper's rule),
        "sum" its sum, "amax" its max.
      unmerge(x [B, T - r, C]) -> [B, T, C], every input position gets the value of its group.
    r is capped at (T - protected) // 2; r <= 0 gives identity closures.
    """
    if distill_token and not class_token:
        raise ValueError("bipartite_soft_matching: distill_token=True needs class_token=True (DeiT layout)")
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return _identity, _identity

    # The matching is a discrete choice: no gradient flows into the metric.
    with torch.no_grad():
        metric = F.normalize(metric, dim=-1)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf  # CLS (A[0]) is never a source
        if distill_token:
            scores[..., :, 0] = -math.inf  # the distill token (B[0]) is never a destination

        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]  # A tokens that stay
        src_idx = edge_idx[..., :r, :]  # A tokens merged away
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)  # their B destinations
        if class_token:
            # Protected A tokens score -inf and sort last; restore position order so CLS leads.
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        if mode not in MERGE_REDUCTIONS:
            raise ValueError(f"merge: mode={mode!r} is not one of {MERGE_REDUCTIONS}")
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        # include_self: the destination token is a member of its group (plain mean over the group).
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode, include_self=True)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        if distill_token:
            # Undo merge's [CLS, distill, other A, other B] order back to [A, B].
            x = torch.cat([x[:, :1], x[:, 2 : unm_len + 1], x[:, 1:2], x[:, unm_len + 1 :]], dim=1)
        unm, dst = x[..., :unm_len, :], x[..., unm_len:, :]
        n, _, c = unm.shape
        src = dst.gather(dim=-2, index=dst_idx.expand(n, r, c))
        out = x.new_zeros(n, t, c)
        out[..., 1::2, :] = dst
        out.scatter_(dim=-2, index=(2 * unm_idx).expand(n, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(n, r, c), src=src)
        return out

    return merge, unmerge


def merge_wavg(
    merge: Callable, x: torch.Tensor, size: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ToMe's size-weighted average merge.

    x: [B, T, C]; size: [B, T, 1] patches held by each token (ones if None).
    Returns x [B, T - r, C] (each group's size-weighted mean) and size [B, T - r, 1] (group sums).
    """
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: Callable, x: torch.Tensor, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Track which original input tokens each merged token holds.

    x: [B, T, C] (only its shape is used); source: [B, T, T0] 0/1 membership (identity if None).
    Returns source [B, T - r, T0].
    """
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device, dtype=x.dtype)[None].expand(n, t, t)
    return merge(source, mode="amax")


def parse_r(num_layers: int, r: RSchedule) -> List[int]:
    """Turn an r setting into a per-layer list of tokens to merge (as ToMe's parse_r).

    r: an int (the same r in every layer), a sequence of num_layers ints, or a tuple
    (r, inflection) with inflection in [-1, 1]: -1 decreasing, 0 constant, +1 increasing,
    about r * num_layers tokens in total.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"parse_r: num_layers must be a positive int, got {num_layers!r}")

    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"parse_r: a tuple r must be (r, inflection), got {r!r}")
        r, inflect = r
        if not -1.0 <= inflect <= 1.0:
            raise ValueError(f"parse_r: inflection must be in [-1, 1], got {inflect!r}")
    elif isinstance(r, Sequence) and not isinstance(r, str):
        schedule = list(r)
        if len(schedule) != num_layers:
            raise ValueError(
                f"parse_r: r schedule {schedule} has {len(schedule)} entries, expected one per layer ({num_layers})"
            )
        for value in schedule:
            _check_r(value, schedule)
        return [int(value) for value in schedule]
    else:
        inflect = 0.0

    _check_r(r, r)
    if num_layers == 1:
        return [r]
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def _check_r(value, setting) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"parse_r: r values must be ints, got {value!r} in r={setting!r}")
    if value < 0:
        raise ValueError(f"parse_r: r values must be >= 0, got {value} in r={setting!r}")


def capped_merges(num_tokens: int, r_schedule: List[int], protected: int = 1) -> List[Tuple[int, int, int]]:
    """(layer, r asked, r merged) for every layer whose r exceeds half its unprotected tokens,
    where bipartite_soft_matching caps it (layers count from 1)."""
    counts = merged_token_counts(num_tokens, r_schedule, protected)
    return [(k + 1, r, counts[k] - counts[k + 1]) for k, r in enumerate(r_schedule)
            if r > (counts[k] - protected) // 2]


def merged_token_counts(num_tokens: int, r_schedule: List[int], protected: int = 1) -> List[int]:
    """Token counts through a merging stack: [num_tokens, after layer 1, ..., after last layer].

    Applies the same cap as bipartite_soft_matching: a layer merges min(r, (T - protected) // 2).
    """
    counts = [num_tokens]
    for r in r_schedule:
        t = counts[-1]
        counts.append(t - max(0, min(r, (t - protected) // 2)))
    return counts


def schedule_to_count(num_tokens: int, num_layers: int, target: int, protected: int = 1) -> List[int]:
    """A per-layer r schedule that takes num_tokens to exactly target tokens in num_layers merging layers.

    Merges are spread as evenly as ToMe's cap allows: a layer merges at most (T - protected) // 2
    tokens, so when the later layers cannot merge their even share the earlier ones take more.
    65 -> 29: [18, 18] in 2 layers, [6] * 6 in 6; 257 -> 29 in 6 layers: [38, 38, 38, 38, 48, 28]
    (six layers of r=38 stop at 34, README "Performance"). A target no schedule reaches is a ValueError.
    """
    if not 0 < target <= num_tokens:
        raise ValueError(f"schedule_to_count: target={target} must be in [1, num_tokens={num_tokens}]")
    schedule, t = [], num_tokens
    for k in range(num_layers):
        layers_after = num_layers - k - 1
        # The most tokens the layers after this one can still bring down to target: a layer with
        # t_out outputs takes at most 2 * t_out - protected inputs.
        reachable = target
        for _ in range(layers_after):
            reachable = 2 * reachable - protected
        r = max(math.ceil((t - target) / (layers_after + 1)), t - reachable)
        if r > (t - protected) // 2:
            raise ValueError(f"schedule_to_count: {num_tokens} tokens cannot reach {target} in {num_layers} "
                             f"layer(s): layer {k + 1} would merge {r} of {t} tokens, at most {(t - protected) // 2}")
        schedule.append(r)
        t -= r
    return schedule
