"""The benchmark's rows and how one training step of each is timed, part by part.

A row is a ``Variant``: a registered model, a model type per size, config overrides, and the
``VariantBench`` class that runs it. ``prefix_lm`` rows (EVLGen, BLIP-2 stage 2) time

    ViT forward | connector forward (ln_vision -> connector -> llm_proj) | LLM forward + backward
    to the soft prompts | connector backward | optimizer step

by cutting the graph at the soft prompts (the same ops as ``model(samples)["loss"].backward()``; a
test checks the loss is the same). ``stage1`` rows (no LLM) time the ViT forward and LAVIS's
ITC + ITM + ITG forward + backward after it; the ``cached`` row is EVLGen reading the feature cache. To add
a row, add a ``Variant`` to ``VARIANTS`` and, if its step differs, a ``VariantBench`` subclass
overriding ``vision_tokens`` (or ``step``) registered in ``BENCHES``.
"""
import time
from dataclasses import dataclass, field

import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_evlgen.bench.connectors import CAPTIONS, ConnectorCall, Stage1Connector, connector_call
from lavis_evlgen.datasets.feature_cache import CachedViT
from lavis_evlgen.models.merge import bipartite_soft_matching
from lavis_evlgen.models.tomeformer import TomeFormer

SIZES = ("tiny", "mini")


@dataclass(frozen=True)
class Variant:
    """One benchmark row.

    name: the row's key in bench.json; label: its name in the table; arch: registered model;
    model_types: model type per size (``SIZES``); overrides: model config keys per size (on top of
    the model type); bench: key of the ``VariantBench`` class in ``BENCHES``.
    """

    name: str
    label: str
    arch: str
    model_types: dict
    overrides: dict = field(default_factory=dict)
    bench: str = "prefix_lm"


# The mini rows are the comparison's (projects/compare/mini/*.yaml): same ViT, LLM and MiniLM init;
# full depth 6 layers r=6 and half depth 3 layers r=12 both end at 29 soft prompts. At tiny size
# (tests) both EVLGen rows end at 33 tokens.
VARIANTS = {
    v.name: v
    for v in (
        Variant("evlgen", "EVLGen, full depth", "evlgen_vicuna", {"tiny": "tiny", "mini": "mini"},
                {"tiny": {}, "mini": {"num_layers": 6, "tome_r": 6}}),
        Variant("evlgen_half", "EVLGen, half depth", "evlgen_vicuna", {"tiny": "tiny", "mini": "mini"},
                {"tiny": {"num_layers": 1, "tome_r": 32}, "mini": {"num_layers": 3, "tome_r": 12}}),
        Variant("evlgen_cached", "EVLGen, full depth, cached ViT tokens", "evlgen_vicuna",
                {"tiny": "tiny", "mini": "mini"}, {"tiny": {}, "mini": {"num_layers": 6, "tome_r": 6}}, bench="cached"),
        Variant("blip2_stage1", "BLIP-2 stage 1", "blip2_baseline", {"tiny": "tiny", "mini": "mini"}, bench="stage1"),
        Variant("blip2_stage2", "BLIP-2 stage 2", "blip2_baseline_vicuna", {"tiny": "tiny", "mini": "mini"}),
    )
}


def build_model(variant: Variant, size: str, device: torch.device):
    """The variant's model at ``size`` (model type + overrides), in train mode on ``device``."""
    if size not in variant.model_types:
        raise ValueError(f"variant {variant.name!r} has no model at size {size!r}; sizes: {sorted(variant.model_types)}")
    model_cls = registry.get_model_class(variant.arch)
    cfg = OmegaConf.merge(OmegaConf.load(model_cls.default_config_path(variant.model_types[size])).model,
                          variant.overrides.get(size, {}))
    return model_cls.from_config(cfg).to(device).train()


def make_batch(batch_size: int, image_size: int, device: torch.device, seed: int = 0) -> dict:
    """The inputs every row gets: seeded random images [B, 3, S, S] and shapes-world-like captions."""
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device),
            "text_input": [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]}


class Clock:
    """Wall-clock laps; on CUDA each lap waits for the queued kernels first."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.last = self.now()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        """Seconds since the previous lap (or since the clock was made)."""
        now = self.now()
        elapsed, self.last = now - self.last, now
        return elapsed


class VariantBench:
    """A built model with its optimizer and batch; one timed training step at a time.

    ``step`` returns seconds: ``vit_s``, ``connector_s`` (forward + backward), ``llm_s`` (forward +
    backward), ``optimizer_s``, ``step_s`` (all of it), and the ``loss``.
    """

    def __init__(self, variant: Variant, model, batch: dict, lr: float = 1e-5):
        self.variant, self.model, self.batch = variant, model, batch
        self.device = batch["image"].device
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def vision_tokens(self) -> torch.Tensor:
        """The frozen ViT's tokens of the batch [B, T, C_vit] (no autograd: the ViT is frozen)."""
        with torch.no_grad():
            return self.model.vision_tokens(self.batch["image"])

    def step(self) -> dict[str, float]:
        model, clock = self.model, Clock(self.device)
        start = clock.last
        tokens = self.vision_tokens()
        vit_s = clock.lap()
        hidden, _ = model.connect(model.ln_vision(tokens.float()))
        prefix = model.soft_prompts(hidden)
        connector_forward_s = clock.lap()
        # Cut at the soft prompts so the LLM's forward + backward is timed alone.
        leaf = prefix.detach().requires_grad_()
        loss = model.caption_loss(leaf, self.batch)["loss"]
        loss.backward()
        llm_s = clock.lap()
        prefix.backward(leaf.grad)
        connector_backward_s = clock.lap()
        optimizer_s = self.optimizer_step(clock)
        return {"vit_s": vit_s, "connector_s": connector_forward_s + connector_backward_s, "llm_s": llm_s,
                "optimizer_s": optimizer_s, "step_s": clock.last - start, "loss": loss.item()}

    def optimizer_step(self, clock: Clock) -> float:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return clock.lap()

    def generate(self, beams: int, new_tokens: int) -> float | None:
        """Seconds to caption the batch with beam search, exactly ``new_tokens`` new tokens each
        (min = max length, so every row decodes the same number of steps)."""
        clock = Clock(self.device)
        self.model.generate({"image": self.batch["image"]}, num_beams=beams, max_length=new_tokens,
                            min_length=new_tokens)
        return clock.lap()

    def connector_call(self) -> ConnectorCall:
        """The connector on this batch's ViT tokens, for counting MACs."""
        return connector_call(self.model, self.vision_tokens().float())

    def matching_s(self) -> float | None:
        """Seconds of ToMe matching + merging (forward and backward) in one step: None without merging."""
        connector = getattr(self.model, "connector", None)
        if not isinstance(connector, TomeFormer):
            return None
        return time_matching(connector, self.batch["image"].shape[0], self.vision_tokens().shape[1], self.device)


class Stage1Bench(VariantBench):
    """BLIP-2 stage 1: the ViT, then LAVIS's ITC + ITM + ITG forward + backward (no LLM)."""

    def __init__(self, variant: Variant, model, batch: dict, lr: float = 1e-5):
        super().__init__(variant, model, batch, lr)
        self.connector = Stage1Connector.of(model)

    def vision_tokens(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.visual_encoder(self.batch["image"])

    def step(self) -> dict[str, float]:
        clock = Clock(self.device)
        start = clock.last
        tokens = self.vision_tokens()
        vit_s = clock.lap()
        loss = self.connector(tokens, self.batch["text_input"]).loss
        loss.backward()
        connector_s = clock.lap()
        optimizer_s = self.optimizer_step(clock)
        return {"vit_s": vit_s, "connector_s": connector_s, "llm_s": 0.0, "optimizer_s": optimizer_s,
                "step_s": clock.last - start, "loss": loss.item()}

    def generate(self, beams: int, new_tokens: int) -> None:
        """Stage 1 has no LLM: its Q-Former (ITG) captions are not what the system generates."""
        return None


class CachedBench(VariantBench):
    """A ``prefix_lm`` row reading the ViT's tokens from the feature cache (``run.feature_cache``):
    the tokens are computed once, the model's ViT becomes a ``CachedViT`` and the batch carries the
    tokens [B, T, C_vit] as its ``image``, as the cached datasets do."""

    def __init__(self, variant: Variant, model, batch: dict, lr: float = 1e-5):
        with torch.no_grad():
            tokens = model.vision_tokens(batch["image"])
        model.visual_encoder = CachedViT(*tokens.shape[1:])
        super().__init__(variant, model, {**batch, "image": tokens}, lr)


BENCHES = {"prefix_lm": VariantBench, "stage1": Stage1Bench, "cached": CachedBench}


def time_matching(connector: TomeFormer, batch: int, num_tokens: int, device: torch.device) -> float:
    """Seconds for the TomeFormer's matching and merging alone, at its own shapes.

    Per layer: bipartite soft matching on a metric [B, T, head_dim] (the keys averaged over heads),
    the merge of the hidden states [B, T, C] (+ backward) and of the sizes [B, T, 1], as the
    TomeFormer runs them. The metric is random: matching costs the same for any values.
    """
    config = connector.config
    head_dim = config.hidden_size // config.num_attention_heads
    counts = connector.token_counts(num_tokens)
    clock, total = Clock(device), 0.0
    for t, r in zip(counts[:-1], connector.r_schedule):
        metric = torch.randn(batch, t, head_dim, device=device)
        x = torch.randn(batch, t, config.hidden_size, device=device, requires_grad=True)
        size = torch.ones(batch, t, 1, device=device)
        clock.lap()  # the inputs' creation is not timed
        merge, _ = bipartite_soft_matching(metric, r, class_token=connector.class_token)
        merged = merge(x, mode="mean")
        merge(size, mode="sum")
        merged.backward(torch.ones_like(merged))
        total += clock.lap()
    return total
