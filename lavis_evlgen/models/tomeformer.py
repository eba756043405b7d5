"""TomeFormer: a Hugging Face BERT encoder that merges similar tokens after every attention block.

EVLGen's connector (method.md section 2, step 4). The BERT modules are used as they are; only the
layer loop is ours, so that each layer can (a) run self-attention and expose its keys,
(b) merge r tokens with ToMe bipartite soft matching on the keys averaged over heads,
(c) run the feed-forward sub-layer on the merged tokens. 257 ViT tokens -> 29 with 12 layers of r=19.
"""

import copy
import logging
import re
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from lavis_evlgen.models.merge import (
    RSchedule,
    bipartite_soft_matching,
    merge_source,
    merge_wavg,
    merged_token_counts,
    parse_r,
)

logger = logging.getLogger(__name__)

MERGE_MODES = ("mean", "weighted")
_LAYER_KEY = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


@dataclass
class TomeFormerOutput:
    """last_hidden_state [B, T', C]; size [B, T', 1] patches per token; source [B, T', T] or None."""

    last_hidden_state: torch.Tensor
    size: torch.Tensor
    source: Optional[torch.Tensor] = None


class TomeFormer(nn.Module):
    """BERT encoder over input embeddings that merges tokens after each self-attention block.

    bert: a BertModel (no cross-attention, absolute positions). Its embedding block and encoder
      become this module's `embeddings` and `encoder` (shared, not copied), and its word embeddings
      are removed since inputs arrive as embeddings; state_dict keys are `embeddings.*` and
      `encoder.layer.N.*` as in the authors' `VLconnector`. Prefer the builders
      `from_pretrained` / `from_bert_config`.
    tome_r: tokens merged per layer: int, list with one entry per layer, or (r, inflection).
    merge_mode: "mean" (plain mean of each group, the paper) or "weighted" (ToMe's size-weighted mean).
    prop_attn: add log(size) to the attention logits (ToMe's proportional attention; weighted only).
    class_token: protect the token at position 0 (CLS) from merging.
    trace_source: also return which input tokens each output token holds.
    """

    def __init__(
        self,
        bert: BertModel,
        tome_r: RSchedule = 19,
        merge_mode: str = "mean",
        prop_attn: bool = False,
        class_token: bool = True,
        trace_source: bool = False,
    ):
        super().__init__()
        config = bert.config
        if config.is_decoder or config.add_cross_attention:
            raise ValueError("TomeFormer: the BERT config must be an encoder without cross-attention")
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"TomeFormer: position_embedding_type={config.position_embedding_type!r} is not supported, "
                "only 'absolute' (relative positions lose their meaning once tokens merge)"
            )
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"TomeFormer: merge_mode={merge_mode!r} is not one of {MERGE_MODES}")
        if prop_attn and merge_mode != "weighted":
            raise ValueError(
                "TomeFormer: prop_attn=True needs merge_mode='weighted' "
                "(proportional attention pairs with size-weighted merging)"
            )
        for name, value in (("prop_attn", prop_attn), ("class_token", class_token), ("trace_source", trace_source)):
            if not isinstance(value, bool):
                raise TypeError(f"TomeFormer: {name} must be a bool, got {value!r}")

        self.config = config
        self.embeddings = bert.embeddings
        del self.embeddings.word_embeddings
        self.encoder = bert.encoder
        self.r_schedule = parse_r(len(self.encoder.layer), tome_r)
        self.merge_mode = merge_mode
        self.prop_attn = prop_attn
        self.class_token = class_token
        self.trace_source = trace_source

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_pretrained(cls, name_or_path: str, num_layers: Optional[int] = None, **tome_kwargs) -> "TomeFormer":
        """Load the first num_layers layers (all if None) of a BERT checkpoint (HF directory or name).

        Weights of the dropped layers, the pooler and any pretraining heads are unused; a weight the
        TomeFormer needs but the checkpoint lacks is an error.
        """
        available = BertConfig.from_pretrained(name_or_path).num_hidden_layers
        num_layers = _check_num_layers(num_layers, available, name_or_path)
        bert, info = BertModel.from_pretrained(
            name_or_path, num_hidden_layers=num_layers, add_pooling_layer=False, output_loading_info=True
        )
        # Word embeddings are dropped anyway, so a checkpoint without them is fine.
        missing = [k for k in info["missing_keys"] if not k.startswith("embeddings.word_embeddings.")]
        if missing:
            raise ValueError(f"TomeFormer.from_pretrained: checkpoint {name_or_path!r} lacks weights {missing}")
        unused = info["unexpected_keys"]
        dropped = [k for k in unused if (m := _LAYER_KEY.search(k)) and int(m.group(1)) >= num_layers]
        logger.info(
            "TomeFormer: kept %d of %d layers of %s; %d weights of dropped layers and %d other weights unused",
            num_layers, available, name_or_path, len(dropped), len(unused) - len(dropped),
        )
        return cls(bert, **tome_kwargs)

    @classmethod
    def from_bert_config(cls, config: BertConfig, num_layers: Optional[int] = None, **tome_kwargs) -> "TomeFormer":
        """Randomly initialised TomeFormer with the first num_layers (all if None) layers of config."""
        num_layers = _check_num_layers(num_layers, config.num_hidden_layers, "the BertConfig")
        config = copy.deepcopy(config)
        config.num_hidden_layers = num_layers
        return cls(BertModel(config, add_pooling_layer=False), **tome_kwargs)

    # ---------------------------------------------------------------- shapes
    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layer)

    def token_counts(self, num_tokens: int) -> List[int]:
        """[num_tokens, after layer 1, ..., after the last layer]."""
        return merged_token_counts(num_tokens, self.r_schedule, protected=int(self.class_token))

    def output_token_count(self, num_tokens: int) -> int:
        """Number of output tokens for num_tokens input tokens."""
        return self.token_counts(num_tokens)[-1]

    def extra_repr(self) -> str:
        r = self.r_schedule[0] if len(set(self.r_schedule)) == 1 else self.r_schedule
        return (
            f"num_layers={self.num_layers}, r={r}, merge_mode={self.merge_mode}, prop_attn={self.prop_attn}, "
            f"class_token={self.class_token}, trace_source={self.trace_source}"
        )

    # ---------------------------------------------------------------- forward
    def forward(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> TomeFormerOutput:
        """inputs_embeds [B, T, C] -> TomeFormerOutput with T' = output_token_count(T) tokens.

        attention_mask: None or all ones [B, T]. Merged tokens mix positions, so a padding mask
        cannot follow them; images are never padded.
        """
        self._check_inputs(inputs_embeds, attention_mask)
        x = self.embeddings(inputs_embeds=inputs_embeds)
        size = x.new_ones(x.shape[0], x.shape[1], 1)
        source = None  # merge_source starts from the identity

        for layer, r in zip(self.encoder.layer, self.r_schedule):
            x, metric = self._self_attention(layer, x, size if self.prop_attn else None)
            merge, _ = bipartite_soft_matching(metric, r, class_token=self.class_token)
            if self.trace_source:
                source = merge_source(merge, x, source)
            if self.merge_mode == "weighted":
                x, size = merge_wavg(merge, x, size)
            else:
                x, size = merge(x, mode="mean"), merge(size, mode="sum")
            x = layer.output(layer.intermediate(x), x)

        return TomeFormerOutput(last_hidden_state=x, size=size, source=source)

    def _self_attention(self, layer: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]):
        """BERT's self-attention sub-layer (attention, residual, LayerNorm) on x [B, T, C].

        Computed here rather than by `layer.attention` to expose the keys and add the
        proportional-attention bias log(size). Returns x [B, T, C] and metric [B, T, C/heads]
        (the keys averaged over heads).
        """
        attn = layer.attention.self
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, attn.num_attention_heads, attn.attention_head_size).transpose(1, 2)

        q, k, v = heads(attn.query(x)), heads(attn.key(x)), heads(attn.value(x))
        bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)  # [B, 1, 1, T]
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.dropout.p if self.training else 0.0
        )
        context = context.transpose(1, 2).reshape(b, t, attn.all_head_size)
        return layer.attention.output(context, x), k.mean(1)

    def _check_inputs(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> None:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.hidden_size:
            raise ValueError(
                f"TomeFormer: inputs_embeds must be [B, T, {self.hidden_size}], got {list(inputs_embeds.shape)}"
            )
        num_tokens = inputs_embeds.shape[1]
        if num_tokens > self.config.max_position_embeddings:
            raise ValueError(
                f"TomeFormer: {num_tokens} input tokens exceed max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        if attention_mask is None:
            return
        if attention_mask.shape != inputs_embeds.shape[:2]:
            raise ValueError(
                f"TomeFormer: attention_mask must be [B, T] = {list(inputs_embeds.shape[:2])}, "
                f"got {list(attention_mask.shape)}"
            )
        if not bool((attention_mask == 1).all()):
            raise ValueError(
                "TomeFormer merges tokens and does not support padding masks: attention_mask must be "
                "None or all ones (images are never padded)"
            )


def _check_num_layers(num_layers: Optional[int], available: int, where: str) -> int:
    if num_layers is None:
        return available
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= available:
        raise ValueError(f"TomeFormer: num_layers={num_layers!r} must be an int in [1, {available}] for {where}")
    return num_layers
