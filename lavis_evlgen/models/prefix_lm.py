"""The shared skeleton of EVLGen and BLIP-2 stage 2: a frozen ViT, a trainable connector, a frozen LLM.

    image [B, 3, H, W] -> visual_encoder (frozen) -> ln_vision -> connector (subclass) -> llm_proj
    -> soft prompts [B, N, D_llm] prepended to the text embeddings of the frozen LLM.

Subclasses build their connector in ``build_connector`` and run it in ``connect``; the LM loss,
captioning and VQA decoding, freezing and checkpoint loading live here once.

Every loss and decoder gets its soft prompts from ``encode_visual(samples)``, which reads
``samples["image"]`` here; a model with another visual input (the video models read
``samples["video"]``) overrides that one method.
"""
import contextlib
import dataclasses
import logging
from dataclasses import dataclass

import torch
from lavis.models.base_model import BaseModel
from torch import nn

from lavis_evlgen.common.checkpoint import ALLOW_OTHER_MODEL_KEY, StrictCheckpointLoading
from lavis_evlgen.common.lemmatize import lemmatize
from lavis_evlgen.common.prompts import VQA_PROMPT
from lavis_evlgen.models.llm import build_llm
from lavis_evlgen.models.vision import build_vision_encoder, vision_token_count

# PrefixLMConfig.text_convention's values (see there).
TEXT_CONVENTIONS = ("newline", "vicuna_authors")
# The authors' Vicuna tokenizer (method.md section 6; their blip2_vicuna_instruct-style model).
VICUNA_AUTHORS_SPECIAL_TOKENS = {"pad_token": "[PAD]", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>"}

# Keys of a model config that are not architecture options: LAVIS's, and the checkpoint loading's.
LAVIS_BOOKKEEPING_KEYS = {"arch", "model_type", "load_pretrained", "pretrained", "load_finetuned", "finetuned", ALLOW_OTHER_MODEL_KEY}


@dataclass
class ModelConfig:
    """Base of the model config dataclasses: the one place each model's defaults live."""

    @classmethod
    def from_dict(cls, cfg):
        """Build from a LAVIS model config (dict or DictConfig); unknown keys are an error."""
        cfg = dict(cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - known - LAVIS_BOOKKEEPING_KEYS
        if unknown:
            raise KeyError(f"unknown {cls.__name__} key(s) {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in cfg.items() if k in known})


@dataclass
class VisionConfig(ModelConfig):
    """The frozen vision encoder (factory: models/vision.py), with the paper's defaults."""

    vit_model: str = "eva_clip_g"
    image_size: int = 224
    vit_precision: str = "fp16"
    drop_path_rate: float = 0.0
    use_grad_checkpoint: bool = False
    freeze_vit: bool = True
    # null: the ViT's output; k: the output of its block k (later blocks dropped; HF ViTs only).
    vit_layer: int | None = None


@dataclass
class PrefixLMConfig(VisionConfig):
    """Vision encoder + frozen LLM (factory: models/llm.py) + how text is fed to it."""

    llm_model: str = "facebook/opt-2.7b"
    llm_tokenizer: str | None = None
    llm_precision: str = "fp16"
    prompt: str = ""
    max_txt_len: int = 32
    # Blind-baseline ablation of the soft prompts: None | "zero" (all zeros) | "shuffle" (rolled
    # by one across the batch, so each caption is conditioned on another image).
    prefix_ablation: str | None = None
    # Fidelity switches (README, "Paper scale"), off here, on in the paper-row configs:
    # the frozen LLM in train mode while training (its dropout on, as in the authors' OPT runs);
    llm_train_mode: bool = False
    # how text meets the LLM: "newline" (captions end with "\n", generation stops there or at EOS)
    # or "vicuna_authors" (the authors' Vicuna: "</s>" as BOS/EOS/UNK, an added "[PAD]" token,
    # targets end with "</s>" and never include the BOS, generation stops at "</s>" only);
    text_convention: str = "newline"
    # generate()'s repetition penalty when the caller gives none (the authors' Vicuna: 1.5);
    repetition_penalty: float = 1.0
    # VQA answers lemmatised (nouns and verbs, spaCy's en_core_web_sm) as the authors' OK-VQA runs.
    apply_lemmatizer: bool = False

    def __post_init__(self):
        if self.prefix_ablation not in (None, "zero", "shuffle"):
            raise ValueError(f"prefix_ablation must be null, 'zero' or 'shuffle', got {self.prefix_ablation!r}")
        if self.text_convention not in TEXT_CONVENTIONS:
            raise ValueError(f"text_convention must be one of {TEXT_CONVENTIONS}, got {self.text_convention!r}")


def learned_position_limit(llm: nn.Module) -> int | None:
    """``max_position_embeddings`` of an LLM with a learned position table (OPT, GPT-2), which an
    index beyond it crashes; None for rotary ones (LLaMA), which compute any position."""
    learned = any(isinstance(m, nn.Embedding) and "pos" in name.rsplit(".", 1)[-1] for name, m in llm.named_modules())
    return getattr(llm.config, "max_position_embeddings", None) if learned else None


def check_llm_positions(llm: nn.Module, config: PrefixLMConfig, num_vision_tokens: int,
                        num_soft_prompts: int | None) -> None:
    """ValueError when soft prompts + ``max_txt_len`` text tokens exceed the LLM's learned position
    embeddings (an IndexError deep inside the LLM otherwise)."""
    limit = learned_position_limit(llm)
    if num_soft_prompts is None or limit is None or num_soft_prompts + config.max_txt_len <= limit:
        return
    raise ValueError(f"{num_soft_prompts} soft prompts + max_txt_len={config.max_txt_len} text tokens = "
                     f"{num_soft_prompts + config.max_txt_len} positions exceed the LLM {config.llm_model!r}'s "
                     f"max_position_embeddings={limit} (the ViT {config.vit_model!r} gives {num_vision_tokens} "
                     f"tokens at model.image_size={config.image_size}); lower image_size or max_txt_len, or merge "
                     f"more tokens")


class PrefixLM(StrictCheckpointLoading, BaseModel):
    """A frozen LLM conditioned on soft prompts computed from a frozen ViT by a trainable connector.

    Samples: ``image`` [B, 3, H, W]; ``text_input`` list[str] (captions for training, questions
    for VQA); optional ``prompt`` (str or list[str]).
    """

    PRETRAINED_MODEL_CONFIG_DICT: dict[str, str] = {}
    CONFIG_CLASS = PrefixLMConfig

    def __init__(self, config: PrefixLMConfig):
        super().__init__()
        self.config = config
        self.visual_encoder = build_vision_encoder(
            config.vit_model, config.image_size, config.vit_precision, config.drop_path_rate, config.use_grad_checkpoint,
            config.vit_layer,
        )
        if config.freeze_vit:
            self.visual_encoder.requires_grad_(False)
        num_vision_tokens = vision_token_count(self.visual_encoder, config.vit_model, config.image_size)
        self.ln_vision = nn.LayerNorm(self.visual_encoder.num_features)
        connector_width = self.build_connector(config, self.visual_encoder.num_features)
        num_soft_prompts = self.soft_prompt_count(num_vision_tokens)

        self.llm, self.tokenizer = build_llm(config.llm_model, config.llm_tokenizer, config.llm_precision)
        check_llm_positions(self.llm, config, num_vision_tokens, num_soft_prompts)
        if config.text_convention == "vicuna_authors":
            self.tokenizer.add_special_tokens(VICUNA_AUTHORS_SPECIAL_TOKENS)
            # The added [PAD] row, randomly initialised as in the authors' transformers (no mean
            # resizing), frozen like the rest; padded positions are masked out.
            self.llm.resize_token_embeddings(max(len(self.tokenizer), self.llm.get_input_embeddings().num_embeddings),
                                             mean_resizing=False)
            self.text_end, self.stop_token_ids = self.tokenizer.eos_token, [self.tokenizer.eos_token_id]
        else:
            # Captions end with "\n" (as in BLIP-2/EVLGen); generation stops there or at EOS.
            newline_id = self.tokenizer("\n", add_special_tokens=False).input_ids[-1]
            self.text_end, self.stop_token_ids = "\n", sorted({newline_id, self.tokenizer.eos_token_id})
        self.llm.requires_grad_(False)
        self.llm_proj = nn.Linear(connector_width, self.llm.config.hidden_size)

    def build_connector(self, config, vision_width: int) -> int:
        """Create the trainable connector modules; return the width of its output tokens."""
        raise NotImplementedError(f"{type(self).__name__} must build its connector (PrefixLM is abstract)")

    def soft_prompt_count(self, num_vision_tokens: int) -> int | None:
        """Soft prompts per sample for ``num_vision_tokens`` ViT tokens per image, or None when the
        connector does not say (then the LLM's positions are not checked up front)."""
        return None

    def connect(self, vision_tokens: torch.Tensor):
        """Run the connector: vision_tokens [B, T, C_vit] -> (hidden [B, N, C], connector output)."""
        raise NotImplementedError(f"{type(self).__name__} must run its connector (PrefixLM is abstract)")

    # ---------------------------------------------------------------- bookkeeping
    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode (no dropout, fixed norms) whatever the runner asks; the
        LLM follows ``mode`` with ``llm_train_mode`` (its dropout in training, weights still frozen)."""
        super().train(mode)
        self.llm.train(mode and self.config.llm_train_mode)
        if self.config.freeze_vit:
            self.visual_encoder.eval()
        return self

    def maybe_autocast(self, dtype=torch.float16):
        """fp16 autocast on CUDA (the paper's AMP); nothing on CPU, where it is slower."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- model
    def encode_visual(self, samples: dict, return_connector_output: bool = False):
        """Soft prompts of a batch's visual input: ``encode_image(samples["image"])`` here.

        The one hook every loss and decoder (``forward``, ``generate``, ``predict_answers``, SCST)
        goes through; a model fed something else (video) overrides it.
        Returns:
            prefix [B, N, D_llm]; also the connector's output if asked.
        """
        return self.encode_image(samples["image"], return_connector_output)

    def encode_image(self, image: torch.Tensor, return_connector_output: bool = False):
        """Soft prompts for the LLM.

        Args:
            image: [B, 3, H, W].
        Returns:
            prefix [B, N, D_llm] (N fixed by the connector); also the connector's output if asked.
        """
        hidden, connector_out = self.connect(self.ln_vision(self.vision_tokens(image).float()))
        prefix = self.soft_prompts(hidden)
        return (prefix, connector_out) if return_connector_output else prefix

    def vision_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's tokens of a batch of images [B, 3, H, W] -> [B, N, C_vit] (CLS first; the ViT's dtype).

        Autograd runs through the ViT only when something in it trains (``freeze_vit: False``, or
        modules added to a frozen ViT such as the video models' temporal attention).
        """
        params = list(self.visual_encoder.parameters())  # none when it reads the feature cache
        needs_grad = any(p.requires_grad for p in params)
        with self.maybe_autocast(), torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            return self.visual_encoder(images.to(params[0].dtype) if params else images)

    def soft_prompts(self, hidden: torch.Tensor) -> torch.Tensor:
        """Connector output [B, N, C] -> soft prompts [B, N, D_llm] (llm_proj, then any ``prefix_ablation``)."""
        prefix = self.llm_proj(hidden).to(self.llm.dtype)
        if self.config.prefix_ablation == "zero":
            prefix = torch.zeros_like(prefix)
        elif self.config.prefix_ablation == "shuffle":
            prefix = prefix.roll(1, dims=0)
        return prefix

    def _embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(input_ids)

    def forward(self, samples: dict) -> dict:
        """The model's own loss: ``supervised_loss`` after the soft prompts of ``encode_visual``.

        Returns:
            {"loss": scalar, "loss_lm": scalar, ...}
        """
        prefix, connector_out = self.encode_visual(samples, return_connector_output=True)
        return self.supervised_loss(prefix, connector_out, samples)

    def supervised_loss(self, prefix: torch.Tensor, connector_out, samples: dict) -> dict:
        """The loss against the samples' captions: here the LM loss on ``prompt + caption + "\\n"``
        (``caption_loss``); subclasses add terms that need the connector's output."""
        return self.caption_loss(prefix, samples)

    def caption_loss(self, prefix: torch.Tensor, samples: dict) -> dict:
        """LM loss of the frozen LLM on ``prompt + caption + text_end`` after ``prefix`` [B, N, D_llm]
        (labels -100 there, on the prompt, and with ``text_convention: vicuna_authors`` on the BOS)."""
        device = prefix.device
        prompt = samples.get("prompt", self.config.prompt)
        prompts = [prompt] * len(samples["text_input"]) if isinstance(prompt, str) else list(prompt)

        self.tokenizer.padding_side = "right"
        text = [p + t + self.text_end for p, t in zip(prompts, samples["text_input"])]
        tokens = self.tokenizer(
            text, return_tensors="pt", padding="longest", truncation=True, max_length=self.config.max_txt_len
        ).to(device)
        targets = tokens.input_ids.masked_fill(tokens.attention_mask == 0, -100)
        if any(prompts) or self.config.text_convention == "vicuna_authors":
            # No loss on the prompt: its token count (with any BOS) per sample.
            prompt_lengths = self.tokenizer(prompts, padding=False).input_ids
            for i, ids in enumerate(prompt_lengths):
                targets[i, : len(ids)] = -100

        batch, num_prefix = prefix.shape[:2]
        prefix_mask = torch.ones(batch, num_prefix, dtype=tokens.attention_mask.dtype, device=device)
        inputs_embeds = torch.cat([prefix, self._embed_tokens(tokens.input_ids)], dim=1)
        attention_mask = torch.cat([prefix_mask, tokens.attention_mask], dim=1)
        labels = torch.cat([torch.full_like(prefix_mask, -100), targets], dim=1)
        with self.maybe_autocast():
            loss_lm = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels).loss
        return {"loss": loss_lm, "loss_lm": loss_lm}

    # ---------------------------------------------------------------- inference
    def _generate_from_prompts(self, prefix: torch.Tensor, prompts: list[str], **generate_kwargs) -> list[str]:
        """Decode after [soft prompts ``prefix`` [B, N, D_llm], prompt tokens]; prompts are left-padded so they end together."""
        self.tokenizer.padding_side = "left"
        tokens = self.tokenizer(prompts, return_tensors="pt", padding="longest").to(prefix.device)
        prefix_mask = torch.ones(prefix.shape[:2], dtype=tokens.attention_mask.dtype, device=prefix.device)
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
        repetition_penalty: float | None = None,
        length_penalty: float = 1.0,
        num_captions: int = 1,
        temperature: float = 1.0,
    ) -> list[str]:
        """Captions for the batch's visual input (``samples["image"]`` [B, 3, H, W] here; see
        ``encode_visual``), with LAVIS's signature.

        ``max_length``/``min_length`` count new tokens; ``repetition_penalty`` None: the config's.
        Returns B * num_captions strings.
        """
        prefix = self.encode_visual(samples)
        prompt = samples.get("prompt", self.config.prompt)
        prompts = [prompt] * prefix.size(0) if isinstance(prompt, str) else list(prompt)
        sampling = {"do_sample": True, "top_p": top_p, "temperature": temperature, "num_beams": 1}
        return self._generate_from_prompts(
            prefix,
            prompts,
            **(sampling if use_nucleus_sampling else {"num_beams": num_beams}),
            max_new_tokens=max_length,
            min_new_tokens=min_length,
            repetition_penalty=self.config.repetition_penalty if repetition_penalty is None else repetition_penalty,
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
        prompt: str = VQA_PROMPT,
        length_penalty: float = 0.0,
        **kwargs,
    ) -> list[str]:
        """Zero-shot open-ended VQA: ``prompt.format(question)`` after the image, beam search.

        Args:
            samples: ``image`` [B, 3, H, W] (or what ``encode_visual`` reads), ``text_input`` list of B questions.
        Returns:
            B answers (lemmatised with ``apply_lemmatizer``).
        """
        if inference_method != "generate":
            raise ValueError(f"{type(self).__name__} answers by generation only; inference_method={inference_method!r}")
        questions = samples["text_input"]
        questions = [questions] if isinstance(questions, str) else questions
        prompts = [prompt.format(q) for q in questions] if prompt else list(questions)
        answers = self._generate_from_prompts(
            self.encode_visual(samples),
            prompts,
            num_beams=num_beams,
            max_new_tokens=max_len,
            min_new_tokens=min_len,
            length_penalty=length_penalty,
            repetition_penalty=self.config.repetition_penalty,
        )
        return lemmatize(answers) if self.config.apply_lemmatizer else answers

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg):
        model = cls(cls.CONFIG_CLASS.from_dict(cfg))
        model.load_checkpoint_from_config(cfg)
        logging.info("%s: %s trainable parameters", cls.__name__, f"{model.num_trainable_parameters():,}")
        return model
