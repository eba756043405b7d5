"""BLIP-2 baselines on the plugin's factories (method.md §4), for side-by-side runs with EVLGen.

- ``blip2_baseline`` (stage 1): LAVIS's ``Blip2Qformer`` -- its ITC + ITM + ITG ``forward`` and
  Q-Former captioning ``generate`` are inherited unchanged; only the construction is replaced,
  because LAVIS's hard-codes ``bert-base-uncased`` and the EVA/CLIP ViTs.
- ``blip2_baseline_opt`` / ``blip2_baseline_vicuna`` (stage 2): the Q-Former's query branch as the
  connector of a ``PrefixLM`` (frozen ViT -> Q-Former -> Linear -> frozen LLM, LM loss), as LAVIS's
  ``blip2_opt``, for any causal LM. ``stage1_checkpoint`` starts it from a stage-1 checkpoint;
  without one it starts from BERT: the paper's "BLIP-2 one-stage".
"""
import logging
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from lavis.common.registry import registry
from lavis.models.base_model import BaseModel
from lavis.models.blip2_models.blip2 import LayerNorm
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
from torch import nn

from lavis_evlgen.common.checkpoint import CheckpointMismatchError, StrictCheckpointLoading, check_shapes, read_model_state
from lavis_evlgen.common.paths import model_type_configs
from lavis_evlgen.models.prefix_lm import ModelConfig, PrefixLM, PrefixLMConfig, VisionConfig
from lavis_evlgen.models.qformer import build_qformer, build_qformer_tokenizer, query_branch
from lavis_evlgen.models.vision import build_vision_encoder


@dataclass
class QFormerConfig(ModelConfig):
    """The Q-Former, with LAVIS's BLIP-2 defaults."""

    qformer_init: str = "bert-base-uncased"
    qformer_num_layers: int | None = None  # None: every layer of qformer_init
    num_query_token: int = 32
    cross_attention_freq: int = 2


@dataclass
class BLIP2Stage1Config(QFormerConfig, VisionConfig):
    """BLIP-2 stage 1 (LAVIS ``blip2``): vision encoder + Q-Former + ITC/ITM heads."""

    embed_dim: int = 256
    max_txt_len: int = 32


@dataclass
class BLIP2Config(QFormerConfig, PrefixLMConfig):
    """BLIP-2 stage 2 (LAVIS ``blip2_opt``): vision encoder + Q-Former + frozen LLM."""

    stage1_checkpoint: str | None = None  # a blip2_baseline checkpoint; None: one-stage (Q-Former from BERT)


@registry.register_model("blip2_baseline")
class BLIP2Stage1(StrictCheckpointLoading, Blip2Qformer):
    """BLIP-2 stage 1: ``forward`` returns ITC + ITM + ITG losses (LAVIS's code, unchanged).

    Samples: ``image`` [B, 3, H, W] and ``text_input`` list of B captions, B > 1. Needs
    torch.distributed initialised, as LAVIS's (it gathers negatives across processes).
    """

    PRETRAINED_MODEL_CONFIG_DICT = model_type_configs("blip2_baseline", ["pretrain", "mini", "tiny"])

    def __init__(self, config: BLIP2Stage1Config):
        # The modules Blip2Qformer.__init__ creates, under the same names, from our factories.
        BaseModel.__init__(self)
        self.config = config
        self.tokenizer = build_qformer_tokenizer(config.qformer_init)
        self.visual_encoder = build_vision_encoder(
            config.vit_model, config.image_size, config.vit_precision, config.drop_path_rate, config.use_grad_checkpoint,
            config.vit_layer,
        )
        if config.freeze_vit:
            self.visual_encoder.requires_grad_(False)
        self.ln_vision = LayerNorm(self.visual_encoder.num_features)
        self.Qformer, self.query_tokens = build_qformer(
            config.qformer_init, config.num_query_token, self.visual_encoder.num_features,
            config.cross_attention_freq, config.qformer_num_layers,
        )
        self.Qformer.resize_token_embeddings(len(self.tokenizer))
        width = self.Qformer.config.hidden_size
        self.vision_proj = nn.Linear(width, config.embed_dim)
        self.text_proj = nn.Linear(width, config.embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        self.max_txt_len = config.max_txt_len

    def train(self, mode: bool = True):
        """A frozen ViT stays in eval mode whatever the runner asks."""
        super().train(mode)
        if self.config.freeze_vit:
            self.visual_encoder.eval()
        return self

    def forward(self, samples: dict):
        """{"loss" = loss_itc + loss_itm + loss_lm, and each term} (a LAVIS ``BlipOutput``)."""
        if not dist.is_initialized():
            raise RuntimeError(
                "blip2_baseline (BLIP-2 stage 1) gathers ITC/ITM negatives across processes, so it needs "
                "torch.distributed: launch with `python -m torch.distributed.run --nproc_per_node=N train.py ...` "
                "(N=1 works)"
            )
        return super().forward(samples)

    @torch.no_grad()
    def generate(
        self,
        samples: dict,
        use_nucleus_sampling: bool = False,
        num_beams: int = 3,
        max_length: int = 30,
        min_length: int = 10,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
    ) -> list[str]:
        """ITG captions from the Q-Former for ``samples["image"]`` [B, 3, H, W]: B strings.

        LAVIS's version repeats the image tokens for beam search itself, and transformers 4.51's
        ``generate`` repeats them again (a shape error for num_beams > 1); here only
        ``generate`` expands them.
        """
        image = samples["image"]
        image_embeds = self.ln_vision(self.visual_encoder(image))
        batch = image.size(0)
        outputs = self.Qformer.generate(
            input_ids=torch.full((batch, 1), self.tokenizer.bos_token_id, dtype=torch.long, device=image.device),
            query_embeds=self.query_tokens.expand(batch, -1, -1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device),
            max_length=max_length,
            min_length=min_length,
            num_beams=1 if use_nucleus_sampling else num_beams,
            do_sample=use_nucleus_sampling,
            top_p=top_p if use_nucleus_sampling else None,  # unused by beam search; transformers warns if set
            repetition_penalty=repetition_penalty,
            eos_token_id=self.tokenizer.sep_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self.tokenizer.batch_decode(outputs, skip_special_tokens=True)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @classmethod
    def from_config(cls, cfg) -> "BLIP2Stage1":
        model = cls(BLIP2Stage1Config.from_dict(cfg))
        model.load_checkpoint_from_config(cfg)
        logging.info("%s: %s trainable parameters", cls.__name__, f"{model.num_trainable_parameters():,}")
        return model


# Stage-1 weights that stage 2 has no use for (LAVIS's Blip2OPT drops the same when it loads
# stage 1 non-strictly): the ITC/ITM heads, the ITG LM head, the text embeddings, the text FFNs.
STAGE1_ONLY_KEYS = re.compile(
    r"(vision_proj|text_proj|itm_head)\.|temp$|Qformer\.cls\."
    r"|Qformer\.bert\.embeddings\.(word|position)_embeddings\."
    r"|Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\."
)


class BLIP2(PrefixLM):
    """BLIP-2 stage 2: 32 learned queries cross-attend to the ViT tokens; their outputs are the soft prompts.

    Subclasses register a name and a model-type table.
    """

    CONFIG_CLASS = BLIP2Config

    def __init__(self, config: BLIP2Config):
        super().__init__(config)
        if config.stage1_checkpoint:
            self.load_stage1(config.stage1_checkpoint)

    def build_connector(self, config: BLIP2Config, vision_width: int) -> int:
        self.Qformer, self.query_tokens = build_qformer(
            config.qformer_init, config.num_query_token, vision_width, config.cross_attention_freq, config.qformer_num_layers
        )
        # Only the query branch runs in stage 2 (as in LAVIS's Blip2OPT).
        self.Qformer.cls = None
        self.Qformer.bert.embeddings.word_embeddings = None
        self.Qformer.bert.embeddings.position_embeddings = None
        for layer in self.Qformer.bert.encoder.layer:
            layer.output = None
            layer.intermediate = None
        return self.Qformer.config.hidden_size

    def connect(self, vision_tokens: torch.Tensor):
        """vision_tokens [B, T, C_vit] -> (query outputs [B, Q, C], the Q-Former's output)."""
        output = query_branch(self.Qformer.bert, self.query_tokens, vision_tokens)
        return output.last_hidden_state, output

    def load_stage1(self, url_or_filename: str) -> list[str]:
        """Start from a ``blip2_baseline`` (stage-1) checkpoint: ln_vision, Q-Former and queries.

        Stage-1-only heads (``STAGE1_ONLY_KEYS``) are dropped; any other key the model lacks, or
        a trainable key (other than the new ``llm_proj``) the checkpoint lacks, or a tensor of
        another shape, is an error raised before anything is loaded. Returns the loaded keys.
        """
        state = read_model_state(url_or_filename)
        own = self.state_dict()
        foreign = sorted(k for k in state if k not in own and not STAGE1_ONLY_KEYS.match(k))
        if foreign:
            raise CheckpointMismatchError(
                f"{url_or_filename}: not a stage-1 checkpoint of this Q-Former; {len(foreign)} keys fit neither "
                f"{type(self).__name__} nor the stage-1 heads: {foreign[:8]}"
            )
        loaded = {k: v for k, v in state.items() if k in own}
        missing = sorted(
            name for name, p in self.named_parameters()
            if p.requires_grad and name not in loaded and not name.startswith("llm_proj.")
        )
        if missing:
            raise CheckpointMismatchError(f"{url_or_filename}: {len(missing)} Q-Former keys are missing: {missing[:8]}")
        check_shapes(own, loaded, url_or_filename)
        self.load_state_dict(loaded, strict=False)
        logging.info("BLIP-2 stage 2: loaded %d stage-1 tensors from %s (dropped %d stage-1-only)",
                     len(loaded), url_or_filename, len(state) - len(loaded))
        return sorted(loaded)


@registry.register_model("blip2_baseline_opt")
class BLIP2OPT(BLIP2):
    """BLIP-2 stage 2 with an OPT decoder (LAVIS ``blip2_opt``)."""

    PRETRAINED_MODEL_CONFIG_DICT = model_type_configs("blip2_baseline_opt", ["pretrain_opt2.7b", "tiny"])


@registry.register_model("blip2_baseline_vicuna")
class BLIP2Vicuna(BLIP2):
    """BLIP-2 stage 2 with a LLaMA-family decoder."""

    PRETRAINED_MODEL_CONFIG_DICT = model_type_configs("blip2_baseline_vicuna", ["pretrain_vicuna7b", "mini", "tiny"])
