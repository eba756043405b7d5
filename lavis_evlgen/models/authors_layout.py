"""The EVLGen authors' checkpoint layout (their ``liptome_*`` LAVIS models), translated to ours.

The authors save with LAVIS's ``save_checkpoint``: ``{"model", "optimizer", "config", "scaler",
"epoch"}``, where ``"model"`` is the state dict without frozen *parameters*, so it keeps every
buffer and every second name of a tied weight. Their names and ours (README, "Models"):

| theirs | ours |
|---|---|
| ``ln_vision.*`` | ``ln_vision.*`` |
| ``VL_proj.*`` | ``vit_proj.*`` |
| ``VLconnector.*`` (a BERT encoder) | ``connector.*`` (TomeFormer, the same BERT modules) |
| ``opt_proj.*`` (OPT models) or ``llm_proj.*`` (Vicuna models) | ``llm_proj.*`` |
| ``visual_encoder.blocks.N.temporal_merge.*`` (video) | the N-th block's ``temporal_merge.*`` of our ViT |

Known to be unused, dropped by name and counted (``UNUSED``): the BERT word embeddings and pooler
(the connector reads ViT tokens and returns all of them), BERT's index buffers, OPT's output head
(tied to its frozen input embeddings, so LAVIS saves it under a second name), a LLaMA's rotary
frequency buffers, and the image-text contrastive head of ``beta > 0`` runs (a training-only
term; theirs projects both sides to 256 and differs from ours, so a model with ``beta > 0`` still
misses its own head and refuses the checkpoint). Every other key must fit the model exactly.

The arch is translated with ``AUTHORS_ARCHS`` (the run config LAVIS stores in the checkpoint
names it), so the usual arch/model-type check applies: ``liptome_opt`` loads into
``evlgen_opt``, and an image checkpoint into a video model only with
``allow_other_model_checkpoint`` as for our own. A checkpoint without a run config is checked by
its keys and shapes alone.
"""
import re

import torch
from torch import nn

from lavis_evlgen.common.checkpoint import ForeignLayout

AUTHORS_ARCHS = {
    "liptome_opt": "evlgen_opt",
    "liptome_vicuna": "evlgen_vicuna",
    "liptome_video_opt": "evlgen_video_opt",
    "liptome_video_vicuna": "evlgen_video_vicuna",
}
# Prefixes only the authors' layout has: a checkpoint holding one of them is theirs.
MARKERS = ("VLconnector.", "VL_proj.", "opt_proj.")
RENAMED = {"VL_proj.": "vit_proj.", "VLconnector.": "connector.", "opt_proj.": "llm_proj."}
UNUSED = (
    (re.compile(r"^VLconnector\.embeddings\.word_embeddings\."), "BERT word embeddings"),
    (re.compile(r"^VLconnector\.pooler\."), "BERT pooler"),
    (re.compile(r"^VLconnector\.embeddings\.(position_ids|token_type_ids)$"), "BERT index buffers"),
    (re.compile(r"^opt_model\.lm_head\.weight$"), "OPT output head tied to its input embeddings"),
    (re.compile(r"^(opt_model|llm_model)\..*\.rotary_emb\.inv_freq$"), "LLM rotary frequency buffers"),
    (re.compile(r"^(vision_proj\.|text_proj\.|temp$|SimCSE\.)"), "contrastive head of beta > 0 (training only)"),
)
TEMPORAL = re.compile(r"^visual_encoder\.blocks\.(?P<block>\d+)\.temporal_merge\.(?P<rest>.+)$")


def is_authors_layout(state_dict: dict) -> bool:
    return any(key.startswith(MARKERS) for key in state_dict)


def temporal_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes of the model's temporal modules in block order (``...temporal_merge.``)."""
    return [f"{name}." for name, _ in model.named_modules() if name.endswith("temporal_merge")]


def our_key(key: str, temporal: list[str]) -> str:
    """The model's name for the authors' ``key``; a key with no counterpart is returned as it is
    (the loader then names it as one the model does not have)."""
    for theirs, ours in RENAMED.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    match = TEMPORAL.match(key)
    if match and int(match["block"]) < len(temporal):
        return temporal[int(match["block"])] + match["rest"]
    return key


def unused_reason(key: str) -> str | None:
    return next((reason for pattern, reason in UNUSED if pattern.search(key)), None)


def translate(checkpoint: dict, model: nn.Module) -> ForeignLayout | None:
    """``checkpoint`` in our layout for ``model`` (None: it is not in the authors' layout)."""
    state_dict: dict[str, torch.Tensor] = checkpoint["model"]
    if not is_authors_layout(state_dict):
        return None
    temporal = temporal_prefixes(model)
    renamed, dropped, original_names = {}, {}, {}
    for key, tensor in state_dict.items():
        reason = unused_reason(key)
        if reason is not None:
            dropped.setdefault(reason, []).append(key)
            continue
        ours = our_key(key, temporal)
        renamed[ours] = tensor
        original_names[ours] = key
    model_cfg = (checkpoint.get("config") or {}).get("model") or {}
    arch = model_cfg.get("arch")
    translated = {**checkpoint, "model": renamed, "arch": AUTHORS_ARCHS.get(arch, arch),
                  "model_type": model_cfg.get("model_type")}
    name = f"the EVLGen authors' layout ({arch or 'no run config'})"
    return ForeignLayout(name=name, checkpoint=translated, dropped=dropped, original_names=original_names)
