"""Average pooling of ViT tokens on their patch grid: the ``avgpool`` connector's token reduction.

The baseline a practitioner tries before token merging (README, "The r trade-off"): the same
number of output tokens as a ToMe schedule, reached by averaging fixed neighbourhoods of patches
instead of merging similar tokens. The CLS token is kept apart, as ToMe protects it.
"""
import math

import torch
import torch.nn.functional as F


def pool_grid(grid: int, num_pooled: int) -> tuple[int, int]:
    """The (rows, columns) a grid x grid patch map is pooled to so that rows * columns == num_pooled:
    the factor pair closest to square that fits in the grid (28 patches of an 8 x 8 map: 4 x 7).

    A count with no such pair (a prime above grid) is a ValueError naming it.
    """
    pairs = [(h, num_pooled // h) for h in range(1, grid + 1) if num_pooled % h == 0 and num_pooled // h <= grid]
    if not pairs:
        raise ValueError(f"connector avgpool: {num_pooled} pooled patches do not tile a {grid} x {grid} patch grid "
                         f"as rows x columns (each <= {grid}); choose tome_r so that the soft prompts less CLS do")
    return min(pairs, key=lambda hw: (abs(hw[0] - hw[1]), hw[0]))


def pooled_shape(num_tokens: int, num_out: int) -> tuple[int, int, int]:
    """(grid, rows, columns): num_tokens = 1 + grid * grid (CLS, then the patch map) pooled to num_out
    tokens = 1 + rows * columns. Not a square patch map, or a count that does not tile it, is a ValueError."""
    grid = math.isqrt(num_tokens - 1)
    if grid * grid != num_tokens - 1:
        raise ValueError(f"connector avgpool: {num_tokens - 1} patch tokens (CLS aside) are not a square grid")
    return (grid, *pool_grid(grid, num_out - 1))


def avg_pool_tokens(tokens: torch.Tensor, num_out: int) -> torch.Tensor:
    """tokens [B, 1 + g*g, C] (CLS first, then a g x g patch grid in raster order) -> [B, num_out, C]:
    CLS, then the patches average-pooled (adaptive windows) to the ``pool_grid`` of num_out - 1 cells."""
    cls, patches = tokens[:, :1], tokens[:, 1:]
    grid, rows, cols = pooled_shape(tokens.shape[1], num_out)
    b, _, c = patches.shape
    patch_map = patches.transpose(1, 2).reshape(b, c, grid, grid)
    pooled = F.adaptive_avg_pool2d(patch_map, (rows, cols)).flatten(2).transpose(1, 2)
    return torch.cat([cls, pooled], dim=1)
