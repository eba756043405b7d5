"""Temporal attention in Hugging Face ViT-family layers: transformers' ``Dinov2Layer`` and ``ViTLayer``.

Each patched forward is the host's (transformers 4.51.3) with ``temporal_merge`` inserted after the
attention residual (layer scale and drop path included) and before the norm/MLP residual.
"""
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer
from transformers.models.vit.modeling_vit import ViTLayer

from lavis_evlgen.models.patch import patch_blocks
from lavis_evlgen.models.temporal import TemporalContext


class TemporalDinov2Layer(Dinov2Layer):
    """``Dinov2Layer`` with ``temporal_merge`` between its two residuals."""

    def forward(
        self, hidden_states: torch.Tensor, head_mask: Optional[torch.Tensor] = None, output_attentions: bool = False
    ):
        """hidden_states [B*T, N, C] -> (layer_output [B*T, N, C], attention weights if asked)."""
        attention_outputs = self.attention(self.norm1(hidden_states), head_mask, output_attentions=output_attentions)
        hidden_states = self.drop_path(self.layer_scale1(attention_outputs[0])) + hidden_states
        hidden_states = self.temporal_merge(hidden_states, self.temporal_context.frames())
        layer_output = self.drop_path(self.layer_scale2(self.mlp(self.norm2(hidden_states)))) + hidden_states
        return (layer_output,) + attention_outputs[1:]


class TemporalViTLayer(ViTLayer):
    """``ViTLayer`` with ``temporal_merge`` between its two residuals."""

    def forward(
        self, hidden_states: torch.Tensor, head_mask: Optional[torch.Tensor] = None, output_attentions: bool = False
    ):
        """hidden_states [B*T, N, C] -> (layer_output [B*T, N, C], attention weights if asked)."""
        attention_outputs = self.attention(
            self.layernorm_before(hidden_states), head_mask, output_attentions=output_attentions
        )
        hidden_states = attention_outputs[0] + hidden_states
        hidden_states = self.temporal_merge(hidden_states, self.temporal_context.frames())
        # ViTOutput adds the second residual itself.
        layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)), hidden_states)
        return (layer_output,) + attention_outputs[1:]


PATCHED = {Dinov2Layer: TemporalDinov2Layer, ViTLayer: TemporalViTLayer}


def add_temporal(encoder: nn.Module, temporal_pos_embed: bool = False, max_frames: int = 8) -> TemporalContext:
    """Patch every ``Dinov2Layer``/``ViTLayer`` in ``encoder`` (a transformers model or a module holding one).

    Returns the blocks' shared ``TemporalContext`` (set ``num_frames`` before each forward).
    """
    model = next((m for m in encoder.modules() if isinstance(m, PreTrainedModel)), None)
    if model is None:
        raise TypeError(f"add_temporal: {type(encoder).__name__} holds no transformers model")
    return patch_blocks(encoder, PATCHED, model.get_input_embeddings(), temporal_pos_embed, max_frames)
