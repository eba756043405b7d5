"""EVLGen-image: frozen ViT -> ln_vision -> Linear -> TomeFormer -> Linear -> frozen LLM.

One implementation serves every LLM; ``evlgen_opt`` and ``evlgen_vicuna`` differ only in
their model-type table. Trained in one stage with the LLM's captioning loss (method.md §2).
"""
import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.models.base_model import BaseModel
from torch import nn

from lavis_evlgen.assets.resolver import resolve_pretrained
from lavis_evlgen.common.checkpoint import load_trainable_state
from lavis_evlgen.common.paths import CONFIG_ROOT
from lavis_evlgen.models.llm import build_llm
from lavis_evlgen.models.tomeformer import TomeFormer
from lavis_evlgen.models.vision import build_vision_encoder, load_base_model

# Keys LAVIS puts in a model config that are not architecture options.
LAVIS_BOOKKEEPING_KEYS = {"arch", "model_type", "load_pretrained", "pretrained", "load_finetuned", "finetuned"}


@dataclass
class EVLGenConfig:
    """Every option of an EVLGen model, with the paper's OPT-2.7b defaults (method.md §2).

    This is the one place defaults live; ``from_config`` only filters and validates keys.
    """

    # Frozen vision encoder (factory: models/vision.py)
    vit_model: str = "eva_clip_g"
    image_size: int = 224
    vit_precision: str = "fp16"
    drop_path_rate: float = 0.0
    use_grad_checkpoint: bool = False
    freeze_vit: bool = True
    # TomeFormer connector, initialised from a BERT checkpoint
    connector_init: str = "bert-base-uncased"
    num_layers: int = 12
    tome_r: Any = 19
    merge_mode: str = "mean"
    prop_attn: bool = False
    # Frozen LLM (factory: models/llm.py)
    llm_model: str = "facebook/opt-2.7b"
    llm_tokenizer: str | None = None
    llm_precision: str = "fp16"
    prompt: str = ""
    max_txt_len: int = 32
    # Optional image-text contrastive term against a frozen sentence encoder (off in the paper)
    beta: float = 0.0
    sentence_encoder: str = "princeton-nlp/sup-simcse-bert-base-uncased"
    contrastive_temp: float = 0.07
    # Blind-baseline ablation of the soft prompts: None | "zero" (all zeros) | "shuffle" (rolled
    # by one across the batch, so each caption is conditioned on another image).
    prefix_ablation: str | None = None

    def __post_init__(self):
        if self.prefix_ablation not in (None, "zero", "shuffle"):
            raise ValueError(f"prefix_ablation must be null, 'zero' or 'shuffle', got {self.prefix_ablation!r}")

    @classmethod
    def from_dict(cls, cfg) -> "EVLGenConfig":
        """Build from a LAVIS model config (dict or DictConfig); unknown keys are an error."""
        cfg = dict(cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - known - LAVIS_BOOKKEEPING_KEYS
        if unknown:
            raise KeyError(f"unknown EVLGen model config key(s) {sorted(unknown)}; known keys: {sorted(known)}")
        values = {k: v for k, v in cfg.items() if k in known}
        r = values.get("tome_r")
        if r is not None and not isinstance(r, int):
            # YAML has no tuples: [r, inflection] with a float inflection is ToMe's (r, inflection).
            r = list(r)
            values["tome_r"] = tuple(r) if len(r) == 2 and isinstance(r[1], float) else r
        return cls(**values)


class EVLGen(BaseModel):
    """EVLGen-image. Subclasses register a name and a model-type table.

    Samples: ``image`` [B, 3, H, W]; ``text_input`` list[str] (captions for training,
    questions for VQA); optional ``prompt`` (str or list[str]).
    """

    PRETRAINED_MODEL_CONFIG_DICT: dict[str, str] = {}

    def __init__(self, config: EVLGenConfig):
        super().__init__()
        self.config = config
        self.visual_encoder = build_vision_encoder(
            config.vit_model, config.image_size, config.vit_precision, config.drop_path_rate, config.use_grad_checkpoint
        )
        if config.freeze_vit:
            self.visual_encoder.requires_grad_(False)
        self.ln_vision = nn.LayerNorm(self.visual_encoder.num_features)

        self.connector = TomeFormer.from_pretrained(
            resolve_pretrained(config.connector_init, config_key="connector_init"),
            num_layers=config.num_layers,
            tome_r=config.tome_r,
            merge_mode=config.merge_mode,
            prop_attn=config.prop_attn,
        )
        self.vision_proj = nn.Linear(self.visual_encoder.num_features, self.connector.hidden_size)

        self.llm, self.tokenizer = build_llm(config.llm_model, config.llm_tokenizer, config.llm_precision)
        self.llm.requires_grad_(False)
        self.llm_proj = nn.Linear(self.connector.hidden_size, self.llm.config.hidden_size)
        # Captions end with "\n" (as in BLIP-2/EVLGen); generation stops there or at EOS.
        newline_id = self.tokenizer("\n", add_special_tokens=False).input_ids[-1]
        self.stop_token_ids = sorted({newline_id, self.tokenizer.eos_token_id})

        if config.beta > 0:
            self._build_contrastive_head(config)
        logging.info("%s: %s trainable parameters", type(self).__name__, f"{self.num_trainable_parameters():,}")

    def _build_contrastive_head(self, config: EVLGenConfig):
        from transformers import AutoTokenizer

        path = resolve_pretrained(config.sentence_encoder, config_key="sentence_encoder")
        self.sentence_encoder = load_base_model(path).requires_grad_(False)
        self.sentence_tokenizer = AutoTokenizer.from_pretrained(path)
        self.contrastive_proj = nn.Linear(self.connector.hidden_size, self.sentence_encoder.config.hidden_size)
        self.contrastive_logit_scale = nn.Parameter(torch.tensor(1.0 / config.contrastive_temp).log())

    # ---------------------------------------------------------------- bookkeeping
    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode (no dropout, fixed norms) whatever the runner asks."""
        super().train(mode)
        self.llm.eval()
        if self.config.freeze_vit:
            self.visual_encoder.eval()
        if self.config.beta > 0:
            self.sentence_encoder.eval()
        return self

    def maybe_autocast(self, dtype=torch.float16):
        """fp16 autocast on CUDA (the paper's AMP); nothing on CPU, where it is slower."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- model
    def encode_image(self, image: torch.Tensor, return_connector_output: bool = False):
        """Soft prompts for the LLM.

        Args:
            image: [B, 3, H, W].
        Returns:
            prefix [B, N, D_llm] with N = connector.output_token_count(T) (29 for the paper's
            257 ViT tokens and 12 layers of r=19); also the TomeFormer output if asked.
        """
        vit_param = next(self.visual_encoder.parameters())
        with self.maybe_autocast(), torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vit):
            tokens = self.visual_encoder(image.to(vit_param.dtype))
        tokens = self.ln_vision(tokens.float())
        connector_out = self.connector(self.vision_proj(tokens))
        prefix = self.llm_proj(connector_out.last_hidden_state).to(self.llm.dtype)
        if self.config.prefix_ablation == "zero":
            prefix = torch.zeros_like(prefix)
        elif self.config.prefix_ablation == "shuffle":
            prefix = prefix.roll(1, dims=0)
        return (prefix, connector_out) if return_connector_output else prefix

    def _embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(input_ids)

    def forward(self, samples: dict) -> dict:
        """LM loss on ``prompt + caption + "\\n"`` after the image soft prompts (labels -100 there).

        Returns:
            {"loss": scalar, "loss_lm": scalar[, "loss_itc": scalar]}
        """
        image = samples["image"]
        prefix, connector_out = self.encode_image(image, return_connector_output=True)
        prompt = samples.get("prompt", self.config.prompt)
        prompts = [prompt] * len(samples["text_input"]) if isinstance(prompt, str) else list(prompt)

        self.tokenizer.padding_side = "right"
        text = [p + t + "\n" for p, t in zip(prompts, samples["text_input"])]
        tokens = self.tokenizer(
            text, return_tensors="pt", padding="longest", truncation=True, max_length=self.config.max_txt_len
        ).to(image.device)
        targets = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
        if any(prompts):
            # No loss on the prompt: its token count (with any BOS) per sample.
            prompt_lengths = self.tokenizer(prompts, padding=False).input_ids
            for i, ids in enumerate(prompt_lengths):
                targets[i, : len(ids)] = -100

        batch, num_prefix = prefix.shape[:2]
        prefix_mask = torch.ones(batch, num_prefix, dtype=tokens.attention_mask.dtype, device=image.device)
        inputs_embeds = torch.cat([prefix, self._embed_tokens(tokens.input_ids)], dim=1)
        attention_mask = torch.cat([prefix_mask, tokens.attention_mask], dim=1)
        labels = torch.cat([torch.full_like(prefix_mask, -100), targets], dim=1)
        with self.maybe_autocast():
            loss_lm = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels).loss
        out = {"loss": loss_lm, "loss_lm": loss_lm}
        if self.config.beta > 0:
            out["loss_itc"] = self._contrastive_loss(connector_out.last_hidden_state[:, 0], samples["text_input"])
            out["loss"] = loss_lm + self.config.beta * out["loss_itc"]
        return out

    def _contrastive_loss(self, image_cls: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Symmetric InfoNCE between TomeFormer CLS [B, C] and frozen sentence embeddings (in-batch negatives)."""
        tok = self.sentence_tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
        with torch.no_grad():
            text_emb = self.sentence_encoder(**tok.to(image_cls.device)).last_hidden_state[:, 0]
        image_emb = F.normalize(self.contrastive_proj(image_cls), dim=-1)
        text_emb = F.normalize(text_emb.float(), dim=-1)
        logits = self.contrastive_logit_scale.exp() * image_emb @ text_emb.t()
        target = torch.arange(len(texts), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2

    # ---------------------------------------------------------------- inference
    def _generate_from_prompts(self, image: torch.Tensor, prompts: list[str], **generate_kwargs) -> list[str]:
        """Decode after [image soft prompts, prompt tokens]; prompts are left-padded so they end together."""
        prefix = self.encode_image(image)
        self.tokenizer.padding_side = "left"
        tokens = self.tokenizer(prompts, return_tensors="pt", padding="longest").to(image.device)
        prefix_mask = torch.ones(prefix.shape[:2], dtype=tokens.attention_mask.dtype, device=image.device)
        # An empty prompt with a tokenizer that adds no BOS gives no tokens (an empty float tensor).
        inputs_embeds = torch.cat([prefix, self._embed_tokens(tokens.input_ids.long())], dim=1)
        attention_mask = torch.cat([prefix_mask, tokens.attention_mask], dim=1)
        with self.maybe_autocast():
            output_ids = self.llm.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                eos_token_id=self.stop_token_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                **generate_kwargs,
            )
        # With inputs_embeds only, generate returns just the new tokens.
        return [t.strip() for t in self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)]

    @torch.no_grad()
    def generate(
        self,
        samples: dict,
        use_nucleus_sampling: bool = False,
        num_beams: int = 5,
        max_length: int = 30,
        min_length: int = 1,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        num_captions: int = 1,
        temperature: float = 1.0,
    ) -> list[str]:
        """Captions for ``samples["image"]`` [B, 3, H, W] (LAVIS's signature).

        ``max_length``/``min_length`` count new tokens. Returns B * num_captions strings.
        """
        image = samples["image"]
        prompt = samples.get("prompt", self.config.prompt)
        prompts = [prompt] * image.size(0) if isinstance(prompt, str) else list(prompt)
        sampling = {"do_sample": True, "top_p": top_p, "temperature": temperature, "num_beams": 1}
        return self._generate_from_prompts(
            image,
            prompts,
            **(sampling if use_nucleus_sampling else {"num_beams": num_beams}),
            max_new_tokens=max_length,
            min_new_tokens=min_length,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            num_return_sequences=num_captions,
        )

    @torch.no_grad()
    def predict_answers(
        self,
        samples: dict,
        num_beams: int = 5,
        inference_method: str = "generate",
        max_len: int = 10,
        min_len: int = 1,
        num_ans_candidates: int = 128,
        answer_list: list[str] | None = None,
        prompt: str = "Question: {} Short answer:",
        length_penalty: float = 0.0,
        **kwargs,
    ) -> list[str]:
        """Zero-shot open-ended VQA: ``prompt.format(question)`` after the image, beam search.

        Args:
            samples: ``image`` [B, 3, H, W], ``text_input`` list of B questions.
        Returns:
            B answers.
        """
        if inference_method != "generate":
            raise ValueError(f"EVLGen answers by generation only; inference_method={inference_method!r}")
        questions = samples["text_input"]
        questions = [questions] if isinstance(questions, str) else questions
        prompts = [prompt.format(q) for q in questions] if prompt else list(questions)
        return self._generate_from_prompts(
            samples["image"],
            prompts,
            num_beams=num_beams,
            max_new_tokens=max_len,
            min_new_tokens=min_len,
            length_penalty=length_penalty,
        )

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg) -> "EVLGen":
        model = cls(EVLGenConfig.from_dict(cfg))
        model.load_checkpoint_from_config(cfg)
        return model

    def load_checkpoint_from_config(self, cfg, **kwargs):
        """Load ``finetuned`` (if load_finetuned) or ``pretrained`` (if load_pretrained) weights."""
        for flag, key in (("load_finetuned", "finetuned"), ("load_pretrained", "pretrained")):
            if cfg.get(flag, False):
                if not cfg.get(key):
                    raise KeyError(f"model config sets {flag}: True but gives no '{key}' checkpoint path")
                self.load_checkpoint(cfg[key])
                return

    def load_checkpoint(self, url_or_filename: str):
        """Load a LAVIS-style checkpoint ``{"model": state_dict, ...}`` holding the trainable weights.

        Missing keys are allowed only for frozen modules; unexpected keys are an error.
        """
        from lavis.common.dist_utils import download_cached_file
        from lavis.common.utils import is_url

        path = download_cached_file(url_or_filename, check_hash=False, progress=True) if is_url(url_or_filename) else url_or_filename
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = checkpoint.get("model", checkpoint)
        return load_trainable_state(self, state_dict, source=str(url_or_filename))


def _model_types(arch: str, names: list[str]) -> dict[str, str]:
    return {name: str(CONFIG_ROOT / "models" / arch / f"{name}.yaml") for name in names}


@registry.register_model("evlgen_opt")
class EVLGenOPT(EVLGen):
    """EVLGen with an OPT decoder (the paper's main model)."""

    PRETRAINED_MODEL_CONFIG_DICT = _model_types("evlgen_opt", ["pretrain_opt2.7b", "pretrain_opt6.7b", "tiny"])


@registry.register_model("evlgen_vicuna")
class EVLGenVicuna(EVLGen):
    """EVLGen with a LLaMA-family decoder (Vicuna-7b in the paper; any LLaMA-architecture LM works)."""

    PRETRAINED_MODEL_CONFIG_DICT = _model_types("evlgen_vicuna", ["pretrain_vicuna7b", "mini", "mini_smollm2", "tiny"])
