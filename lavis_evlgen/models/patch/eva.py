"""Temporal attention in LAVIS's EVA ViT (``lavis.models.eva_vit``, EVA-CLIP ViT-g for BLIP-2/EVLGen).

The patched ``Block.forward`` is the authors' (EVLGen repo, ``lavis/models/eva_vit_g.py``): LAVIS's,
with ``temporal_merge`` after the attention residual and before the MLP residual. The number of
frames comes from the shared context rather than a ``num_frames`` argument, so LAVIS's
``VisionTransformer`` (which calls ``blk(x, rel_pos_bias)``) runs unchanged. State-dict names match
the authors': ``blocks.N.temporal_merge.{query,key}.{weight,bias}``, ``blocks.N.temporal_merge.alpha``.
"""
from typing import Optional

import torch
from lavis.models.eva_vit import Block, VisionTransformer

from lavis_evlgen.models.patch import patch_blocks
from lavis_evlgen.models.temporal import TemporalContext


class TemporalBlock(Block):
    """EVA ``Block`` with ``temporal_merge`` between its two residuals."""

    def forward(self, x: torch.Tensor, rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B*T, N, C] -> [B*T, N, C]."""
        attn = self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias)
        x = x + self.drop_path(attn if self.gamma_1 is None else self.gamma_1 * attn)
        x = self.temporal_merge(x, self.temporal_context.frames())
        mlp = self.mlp(self.norm2(x))
        return x + self.drop_path(mlp if self.gamma_2 is None else self.gamma_2 * mlp)


PATCHED = {Block: TemporalBlock}


def add_temporal(encoder: VisionTransformer, temporal_pos_embed: bool = False, max_frames: int = 8) -> TemporalContext:
    """Patch every ``Block`` of a LAVIS EVA ``VisionTransformer``.

    Returns the blocks' shared ``TemporalContext`` (set ``num_frames`` before each forward).
    """
    return patch_blocks(encoder, PATCHED, encoder.patch_embed, temporal_pos_embed, max_frames)
