"""EVLGen-video's temporal attention: frames of a video attend to each other at every token position.

method.md section 3. The frames of a video go through the image ViT as a batch of images; inside
every block, between the attention residual and the MLP residual, ``TemporalAttention`` lets each
token position (CLS included) attend across the T frames of its video. Its output is
``x + alpha * attention(x)`` with ``alpha`` initialised to 0, so at initialisation the patched ViT
computes exactly what the image ViT does. The blocks are patched from outside by the adapters in
``lavis_evlgen.models.patch`` (one per host library), which insert a module named
``temporal_merge`` (the authors' attribute name, so their checkpoints load by name) into every block.

How a video model runs the patched ViT::

    context = add_temporal(vit)              # lavis_evlgen.models.patch
    freeze_except_temporal(vit)              # after any freezing of the whole ViT
    ...
    context.num_frames = T                   # before every forward
    tokens = vit(video.flatten(0, 1))        # video [B, T, 3, H, W] -> tokens [B*T, N, C]
    tokens = tokens.view(B, T, *tokens.shape[1:]).mean(1)   # the paper's frame mean: [B, N, C]

Training: the ViT is frozen except these modules, and it must run with autograd on (no
``torch.no_grad`` / ``set_grad_enabled(False)`` around it; ``PrefixLM.vision_tokens`` turns it off
only for a ViT with nothing to train): the loss reaches the temporal module of block k only through
the frozen blocks after it. The ViT may stay in eval mode: the temporal modules have no dropout.
``models/evlgen_video.py`` (EVLGen-video) runs it this way.

Without ``pos_embed`` the module has no notion of frame order: it is equivariant to permuting the
frames of a video, so after the frame mean the ViT's output is invariant to it (reversing a video
gives the same soft prompts). ``pos_embed=True`` (an extension, not in the paper) adds a learned
per-frame-index embedding to the query/key input, initialised to 0 so identity at init still holds.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn


@dataclass
class TemporalContext:
    """What the patched blocks of one encoder share: the number of frames per video of this forward.

    The caller sets ``num_frames`` before each forward (as ToMe's blocks share ``_tome_info``);
    the blocks read it when they run. With gradient checkpointing they run again during backward,
    so it must keep its value until then.
    """

    num_frames: Optional[int] = None

    def frames(self) -> int:
        if self.num_frames is None:
            raise RuntimeError(
                "temporal ViT: the number of frames is not set; set `num_frames` on the TemporalContext "
                "returned by add_temporal before each forward (1 for single images)"
            )
        return self.num_frames


class TemporalAttention(nn.Module):
    """Attention across the frames of each video, separately at every token position.

    The authors' ``TemporalTokenMerge`` (EVLGen repo, ``lavis/models/eva_vit_g.py``):
    query and key are ``Linear(dim, hidden_dim)``; the value is the input itself, split into
    ``num_heads`` heads of ``dim / num_heads`` channels (no value or output projection), so head h's
    attention weights mix channel group h across frames. The scale is ``hidden_dim ** -0.5`` over
    the whole query width (1/16 for 256), not the usual per-head ``(hidden_dim / num_heads) ** -0.5``.

    With one frame the softmax is 1 and the output is ``(1 + alpha) * x``: once alpha has moved off
    0, a single image is not what the image ViT computes.

    The adapters create it in float32 whatever the host's dtype (it trains, the host is frozen; the
    authors' fp16 conversion of EVA made their query/key fp16 but left alpha fp32): the input is
    cast to the module's dtype and the update back to the input's.
    """

    def __init__(
        self, dim: int, hidden_dim: int = 256, num_heads: int = 8, pos_embed: bool = False, max_frames: int = 8
    ):
        super().__init__()
        if dim % num_heads or hidden_dim % num_heads:
            raise ValueError(
                f"TemporalAttention: width {dim} and hidden_dim {hidden_dim} must both be divisible "
                f"by num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.scale = hidden_dim ** -0.5
        self.query = nn.Linear(dim, hidden_dim)
        self.key = nn.Linear(dim, hidden_dim)
        self.alpha = nn.Parameter(torch.zeros([]))
        # One embedding per frame index, up to max_frames; zero so the module is order-blind at init.
        self.frame_pos_embed = nn.Parameter(torch.zeros(max_frames, dim)) if pos_embed else None
        # The authors' init: EVA's VisionTransformer._init_weights reaches these Linears (the
        # pretrained checkpoint has no temporal keys), giving truncated normal(0.02) and zero bias.
        for linear in (self.query, self.key):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x [B*T, N, C] (the T frames of a video contiguous), num_frames T -> [B*T, N, C]."""
        batch, tokens, width = x.shape
        if batch % num_frames:
            raise ValueError(
                f"temporal attention: a batch of {batch} frames does not split into videos of "
                f"num_frames={num_frames} frames each"
            )
        if self.frame_pos_embed is not None and num_frames > len(self.frame_pos_embed):
            raise ValueError(
                f"temporal attention: {num_frames} frames per video, but the frame position embedding "
                f"has max_frames={len(self.frame_pos_embed)}"
            )
        heads = self.num_heads
        # [B*T, N, C] -> [B*N, T, C]: one sequence over frames per video and token position.
        seq = x.reshape(-1, num_frames, tokens, width).transpose(1, 2).reshape(-1, num_frames, width)
        seq = seq.to(self.alpha.dtype)
        qk_input = seq if self.frame_pos_embed is None else seq + self.frame_pos_embed[:num_frames]
        q = self.query(qk_input).view(-1, num_frames, heads, self.query.out_features // heads).transpose(1, 2)
        k = self.key(qk_input).view(-1, num_frames, heads, self.key.out_features // heads).transpose(1, 2)
        v = seq.view(-1, num_frames, heads, width // heads).transpose(1, 2)  # [B*N, heads, T, C/heads]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B*N, heads, T, T]
        out = (attn @ v).transpose(1, 2).reshape(-1, tokens, num_frames, width)  # [B, N, T, C]
        out = out.transpose(1, 2).reshape(batch, tokens, width)
        return x + (self.alpha * out).to(x.dtype)


def temporal_parameters(module: nn.Module) -> List[nn.Parameter]:
    """Every parameter of every ``TemporalAttention`` inside ``module`` (what a frozen-ViT video model trains)."""
    return [p for m in module.modules() if isinstance(m, TemporalAttention) for p in m.parameters()]


def freeze_except_temporal(module: nn.Module) -> None:
    """requires_grad False for every parameter of ``module`` except those of its temporal modules.

    The authors' ``freeze_vit``: everything frozen but names containing ``temporal_merge``.
    """
    module.requires_grad_(False)
    for param in temporal_parameters(module):
        param.requires_grad_(True)
