"""EVLGen-video (method.md section 3): EVLGen-image on the frames of a clip, with temporal attention.

    video [B, C, T, H, W] -> frames [B*T, C, H, W] -> ViT (frozen; + temporal attention in every block)
    -> tokens [B*T, N, C_vit] -> mean over T -> ln_vision -> vit_proj -> TomeFormer -> llm_proj
    -> soft prompts [B, P, D_llm] -> frozen LLM

``video_mode`` picks the row of the paper's MSR-VTT table; they are configurations of one model:

- ``video``: the temporal modules (``models/temporal.py``, patched into every ViT block by
  ``models/patch``) let each token position attend across the T frames; they train with the
  connector while the ViT's own weights stay frozen (the ViT runs with autograd on, so the loss
  reaches block k's module through the frozen blocks after it). ``alpha = 0`` at init: the model
  starts as ``mean``. ``temporal_pos_embed: true`` adds a learned frame-index embedding (zero at
  init) to the modules' query/key input, so frame order can matter (not in the paper).
- ``mean``: no temporal module; the frames' ViT tokens are averaged over T (trained on video).
- ``concat``: no temporal module; each frame's tokens go through ln_vision and the connector on
  their own and the T outputs are concatenated along the token axis: T x P soft prompts.
- ``image``: the image model applied to the frames with mean pooling, for evaluation only (no
  video training): it computes what ``mean`` computes, and its training forward is an error.

Module names are the image model's (``visual_encoder``, ``ln_vision``, ``vit_proj``,
``connector``, ``llm_proj``, ``llm``), so an EVLGen-image checkpoint (written by ``IMAGE_ARCH``
with the same model type) loads: in ``video`` mode its missing temporal keys start fresh (at
identity) and are named in the load's log line (``fresh_key_groups``); any other mismatch is an
error. Temporal keys are the authors' (``visual_encoder.blocks.N.temporal_merge.*`` on EVA ViT-g).
The SCST loss mode is inherited (``scst: true``).
"""
from dataclasses import dataclass

import torch
from lavis.common.registry import registry

from lavis_evlgen.common.paths import model_type_configs
from lavis_evlgen.models.evlgen import EVLGen, EVLGenConfig
from lavis_evlgen.models.patch import add_temporal
from lavis_evlgen.models.temporal import freeze_except_temporal

VIDEO_MODES = ("video", "mean", "concat", "image")


@dataclass
class EVLGenVideoConfig(EVLGenConfig):
    """``EVLGenConfig`` (and so the SCST keys) + how the frames of a clip are combined."""

    # video | mean | concat | image (evaluation only): see the module doc.
    video_mode: str = "video"
    # Learned frame-index embedding in the temporal modules (video mode only; not in the paper).
    temporal_pos_embed: bool = False
    # Frames per clip the model is built for: the frame-position embedding's capacity (clips may
    # have fewer), and in concat mode the clip length it requires (T x P soft prompts). The video
    # and mean modes take any number of frames.
    num_frames: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.video_mode not in VIDEO_MODES:
            raise ValueError(f"video_mode must be one of {VIDEO_MODES}, got {self.video_mode!r}")
        if not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1, got {self.num_frames!r}")
        if self.temporal_pos_embed and self.video_mode != "video":
            raise ValueError(f"temporal_pos_embed is part of the temporal modules: it needs video_mode 'video', "
                             f"not {self.video_mode!r}")
        if self.video_mode == "image" and self.scst:
            raise ValueError("video_mode 'image' evaluates the image model on video frames and does not train; "
                             "SCST-train video_mode 'video' or 'mean'")
        if self.video_mode == "concat" and self.beta > 0:
            raise ValueError("beta > 0: the contrastive term needs one connector output per clip, which "
                             "video_mode 'concat' does not have (it has one per frame)")


class EVLGenVideo(EVLGen):
    """EVLGen-video. Subclasses register a name and a model-type table.

    Samples: ``video`` [B, C, T, H, W] (LAVIS's alpro layout, C = 3); ``text_input`` list[str]
    (captions for training, questions for VQA); optional ``prompt``; ``image_id`` for SCST.
    ``forward``, ``generate`` and ``predict_answers`` are EVLGen's, on the soft prompts of
    ``encode_video``.
    """

    CONFIG_CLASS = EVLGenVideoConfig
    # The registered name of the image model with this decoder: its checkpoints (same model type) load.
    IMAGE_ARCH: str

    def __init__(self, config: EVLGenVideoConfig):
        # The image model first (same construction, same random draws), then the temporal modules.
        super().__init__(config)
        self.temporal_context = None
        if config.video_mode == "video":
            self.temporal_context = add_temporal(
                self.visual_encoder, temporal_pos_embed=config.temporal_pos_embed, max_frames=config.num_frames
            )
            if config.freeze_vit:
                freeze_except_temporal(self.visual_encoder)

    def soft_prompt_count(self, num_vision_tokens: int) -> int:
        """``concat`` mode puts the soft prompts of ``num_frames`` frames side by side."""
        per_frame = super().soft_prompt_count(num_vision_tokens)
        return per_frame * self.config.num_frames if self.config.video_mode == "concat" else per_frame

    # ---------------------------------------------------------------- checkpoints
    def fitting_archs(self) -> tuple[str, ...]:
        """An EVLGen-image checkpoint (``IMAGE_ARCH``, same model type) is one this model loads."""
        return (self.IMAGE_ARCH,)

    def fresh_key_groups(self) -> dict[str, set[str]]:
        """The temporal modules' keys may start fresh, as a whole: an EVLGen-image checkpoint has
        none of them. With ``temporal_pos_embed``, so may the frame-position embeddings alone (a
        video checkpoint trained without them, such as the authors')."""
        keys = set(self.state_dict())
        temporal = {k for k in keys if ".temporal_merge." in k}
        groups = {}
        if temporal:
            groups["temporal modules, which an image checkpoint lacks"] = temporal
        position = {k for k in temporal if k.endswith(".frame_pos_embed")}
        if position:
            groups["frame position embeddings, which a checkpoint trained without temporal_pos_embed lacks"] = position
        return groups

    # ---------------------------------------------------------------- model
    def encode_visual(self, samples: dict, return_connector_output: bool = False):
        """Soft prompts of ``samples["video"]`` [B, C, T, H, W] (``encode_video``)."""
        if "video" not in samples:
            raise KeyError(f"{type(self).__name__} reads samples['video'] [B, C, T, H, W]; the batch has "
                           f"{sorted(samples)}")
        if self.config.video_mode == "image" and self.training and torch.is_grad_enabled():
            raise RuntimeError("video_mode 'image' is evaluation only (the image model on the frames, no video "
                               "training); train video_mode 'mean' for the trained frame-mean baseline")
        return self.encode_video(samples["video"], return_connector_output)

    def check_video(self, video: torch.Tensor) -> tuple[int, int, int, int, int]:
        """(B, C, T, H, W) of a video batch; a ValueError when its layout or frame count does not fit the mode."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"samples['video'] must be [B, C=3, T, H, W] (LAVIS's alpro layout), got shape "
                             f"{list(video.shape)}" + ("; a [B, T, C, H, W] batch needs .transpose(1, 2)"
                                                       if video.ndim == 5 and video.shape[2] == 3 else ""))
        frames, cfg = video.shape[2], self.config
        if cfg.video_mode == "concat" and frames != cfg.num_frames:
            raise ValueError(f"video_mode 'concat' concatenates the soft prompts of num_frames={cfg.num_frames} "
                             f"frames, but samples['video'] has T={frames}: set num_frames (or the processors' n_frms)")
        if cfg.temporal_pos_embed and frames > cfg.num_frames:
            raise ValueError(f"samples['video'] has T={frames} frames, more than the {cfg.num_frames} the frame "
                             f"position embedding covers (num_frames)")
        return tuple(video.shape)

    def encode_video(self, video: torch.Tensor, return_connector_output: bool = False):
        """Soft prompts for the LLM.

        Args:
            video: [B, C, T, H, W].
        Returns:
            prefix [B, P, D_llm] (``concat``: [B, T*P, D_llm], frame by frame); also the connector's
            output if asked (``concat``: that of the B*T frames).
        """
        batch, channels, frames, height, width = self.check_video(video)
        images = video.transpose(1, 2).reshape(batch * frames, channels, height, width)
        if self.temporal_context is not None:
            self.temporal_context.num_frames = frames  # kept until backward (gradient checkpointing reruns blocks)
        tokens = self.vision_tokens(images).float()  # [B*T, N, C_vit]
        if self.config.video_mode == "concat":
            hidden, connector_out = self.connect(self.ln_vision(tokens))  # [B*T, P, C]
            hidden = hidden.reshape(batch, frames * hidden.shape[1], hidden.shape[2])
        else:
            tokens = tokens.view(batch, frames, *tokens.shape[1:]).mean(1)  # the frame mean: [B, N, C_vit]
            hidden, connector_out = self.connect(self.ln_vision(tokens))
        prefix = self.soft_prompts(hidden)
        return (prefix, connector_out) if return_connector_output else prefix


@registry.register_model("evlgen_video_opt")
class EVLGenVideoOPT(EVLGenVideo):
    """EVLGen-video with an OPT decoder (the paper's MSR-VTT model: OPT-2.7b)."""

    IMAGE_ARCH = "evlgen_opt"

    PRETRAINED_MODEL_CONFIG_DICT = model_type_configs("evlgen_video_opt", ["pretrain_opt2.7b", "tiny"])


@registry.register_model("evlgen_video_vicuna")
class EVLGenVideoVicuna(EVLGenVideo):
    """EVLGen-video with a LLaMA-family decoder."""

    IMAGE_ARCH = "evlgen_vicuna"

    PRETRAINED_MODEL_CONFIG_DICT = model_type_configs("evlgen_video_vicuna", ["pretrain_vicuna7b", "mini", "tiny"])
