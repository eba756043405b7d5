"""Self-critical sequence training (SCST) as a loss mode of the prefix-LM models (method.md §3).

With ``scst: true`` in its config, a model that mixes in ``SCSTMixin`` (every EVLGen model, image
and video: ``evlgen_opt``, ``evlgen_vicuna``, ``evlgen_video_opt``, ``evlgen_video_vicuna``) returns
the SCST loss from ``forward(samples)`` while training (LAVIS's runner and tasks call ``model(samples)["loss"]``, so
they drive it unchanged); in eval mode ``forward`` keeps the model's own loss, and ``generate``
is untouched. One step:

1. soft prompts from ``encode_visual(samples)`` (the image, or the video for the video models; with
   gradients into the trainable connector and, for EVLGen-video, the temporal modules);
2. a group of ``scst_group_size`` captions per image from the frozen LLM, without gradients:
   sampling (``scst_temperature``, ``scst_top_p``, ``scst_top_k``) or beam search (the group is
   the top ``scst_group_size`` beams of a beam search that wide);
3. reward = CIDEr-D (``common/cider_d.py``) of each caption against all references of its image,
   with document frequencies computed once from every image of the references file;
4. baseline = the mean reward of the image's group; advantage = reward - baseline (a constant);
5. loss = -mean(advantage * log p(caption)), log p being the caption's token log-probabilities
   under the model (temperature 1, no top-p), re-scored with a teacher-forced pass through the
   LLM after the same soft prompts, summed over the caption's tokens up to and including its stop
   token (newline or EOS; padding and anything after the stop excluded) and divided by their count.
   Gradients reach the connector (and ln_vision, the projections; the temporal modules of a video
   model) through the soft prompts; the LLM and ViT stay frozen.

References reach the loss through a file, ``scst_references``: JSON ``{image_id: [captions]}``
keyed by the ``image_id`` the training samples carry. LAVIS's ``CaptionDataset`` (and the shapes
world's) gives ``image_id`` as a dense index of the image within the dataset (``img_ids``, after
any ``keep_fraction``), not the annotation's id, so build the file from the dataset itself:
``python -m lavis_evlgen.models.scst --cfg-path CFG.yaml --out refs.json`` (or
``write_scst_references(dataset, path)``). Its images are also the corpus of CIDEr-D's document
frequencies.
"""
import argparse
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lavis_evlgen.common.cider_d import CiderD

SCST_DECODINGS = ("sample", "beam")


@dataclass
class SCSTConfig:
    """The SCST knobs; a model config inherits them first (``class EVLGenConfig(SCSTConfig, PrefixLMConfig)``)."""

    # Train with the SCST loss instead of the captioning loss (training forward only).
    scst: bool = False
    # JSON {image_id: [reference captions]} keyed as the training samples' image_id (see module doc).
    scst_references: str | None = None
    # Captions per image; the baseline is their mean reward.
    scst_group_size: int = 5
    # "sample" (multinomial with the knobs below) or "beam" (the top group_size beams).
    scst_decoding: str = "sample"
    # New tokens per caption (the stop token included), as generate's max_length/min_length.
    scst_max_len: int = 30
    scst_min_len: int = 1
    # Sampling only: temperature, nucleus and top-k (0: off) of the sampling distribution.
    scst_temperature: float = 1.0
    scst_top_p: float = 1.0
    scst_top_k: int = 0

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.scst_decoding not in SCST_DECODINGS:
            raise ValueError(f"scst_decoding must be one of {SCST_DECODINGS}, got {self.scst_decoding!r}")
        if not isinstance(self.scst_group_size, int) or self.scst_group_size < 2:
            raise ValueError(f"scst_group_size must be an int >= 2 (the baseline is the group's mean), "
                             f"got {self.scst_group_size!r}")
        if not 1 <= self.scst_min_len <= self.scst_max_len:
            raise ValueError(f"need 1 <= scst_min_len <= scst_max_len, got {self.scst_min_len} and {self.scst_max_len}")
        if self.scst_temperature <= 0 or not 0 < self.scst_top_p <= 1 or self.scst_top_k < 0:
            raise ValueError(f"need scst_temperature > 0, 0 < scst_top_p <= 1, scst_top_k >= 0; got "
                             f"{self.scst_temperature}, {self.scst_top_p}, {self.scst_top_k}")
        if self.scst and not self.scst_references:
            raise ValueError("scst: true needs scst_references, a JSON file {image_id: [captions]} of the "
                             "training references (python -m lavis_evlgen.models.scst --cfg-path CFG --out FILE)")


# ---------------------------------------------------------------------- references
def sample_key(value) -> str:
    """A sample's image_id (tensor element, int or str) as a references-file key."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def load_scst_references(path) -> dict[str, list[str]]:
    """``{image_id: [captions]}`` from a JSON file, keys as strings; checked for shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scst_references: no file {path}")
    refs = json.loads(path.read_text())
    if not isinstance(refs, dict) or not refs:
        raise ValueError(f"scst_references {path} must be a non-empty JSON object {{image_id: [captions]}}")
    out = {}
    for key, caps in refs.items():
        if isinstance(caps, str) or not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"scst_references {path}: image_id {key!r} must map to a non-empty list of captions, got {caps!r}")
        out[str(key)] = caps
    return out


def references_from_dataset(dataset) -> dict[str, list[str]]:
    """``{image_id: [captions]}`` keyed as ``dataset[i]["image_id"]``, from its annotation records.

    LAVIS's ``CaptionDataset`` maps each record's ``image_id`` through ``dataset.img_ids`` (a dense
    index); a dataset without ``img_ids`` is keyed by the record's ``image_id`` as is.
    """
    records = getattr(dataset, "annotation", None)
    if not records or not all("image_id" in r and "caption" in r for r in records):
        raise ValueError(f"{type(dataset).__name__} needs annotation records with 'image_id' and 'caption'")
    img_ids = getattr(dataset, "img_ids", None)
    refs: dict[str, list[str]] = {}
    for r in records:
        key = sample_key(img_ids[r["image_id"]] if img_ids is not None else r["image_id"])
        refs.setdefault(key, []).extend([r["caption"]] if isinstance(r["caption"], str) else list(r["caption"]))
    return refs


def write_scst_references(dataset, path) -> dict[str, list[str]]:
    """Write ``references_from_dataset(dataset)`` as JSON to ``path``; returns it."""
    refs = references_from_dataset(dataset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(refs))
    return refs


# ---------------------------------------------------------------------- the loss
def caption_token_mask(ids: torch.Tensor, stop_token_ids) -> torch.Tensor:
    """Which generated tokens belong to the caption: those up to and including the first stop token.

    Args:
        ids: [N, L] generated token ids (padding after a stop token).
    Returns:
        bool [N, L].
    """
    is_stop = torch.isin(ids, torch.as_tensor(list(stop_token_ids), device=ids.device))
    stops_before = is_stop.long().cumsum(1) - is_stop.long()
    return stops_before == 0


def scst_objective(logprobs: torch.Tensor, rewards: torch.Tensor, group_size: int):
    """-mean((reward - group mean) * logprob) and the advantages.

    Args:
        logprobs: [B * k] length-normalised caption log-probs (differentiable), grouped per image.
        rewards: [B * k] rewards (constants).
        group_size: k.
    """
    grouped = rewards.detach().to(logprobs.dtype).view(-1, group_size)
    advantage = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    return -(advantage * logprobs).mean(), advantage


class SCSTMixin:
    """SCST as the training loss of a ``PrefixLM`` whose config has the ``SCSTConfig`` fields.

    Put it first in the bases (``class EVLGen(SCSTMixin, PrefixLM)``) so its ``forward`` wraps the
    model's own (``PrefixLM.forward``; a model adds loss terms through ``supervised_loss``, not by
    overriding ``forward``). Samples: the visual input ``encode_visual`` reads (``image`` [B, 3, H, W],
    or ``video`` [B, C, T, H, W] for the video models), ``image_id`` (B ids, tensor or list, keys of
    ``scst_references``), optional ``prompt``; ``text_input`` is not used by the SCST loss.
    """

    def forward(self, samples: dict) -> dict:
        if getattr(self.config, "scst", False) and self.training:
            return self.scst_loss(samples)
        return super().forward(samples)

    # ------------------------------------------------------------ references and rewards
    def scst_scorer(self) -> CiderD:
        """CIDEr-D over ``scst_references``, loaded on first use."""
        state = self.__dict__.get("_scst_state")
        if state is None or state[0] != self.config.scst_references:
            if not self.config.scst_references:
                raise ValueError(f"{type(self).__name__}: SCST needs scst_references in the model config")
            refs = load_scst_references(self.config.scst_references)
            state = (self.config.scst_references, refs, CiderD(refs))
            self.__dict__["_scst_state"] = state
            logging.info("SCST: CIDEr-D document frequencies from %d images of %s", len(refs), state[0])
        return state[2]

    def scst_references_for(self, image_ids) -> list[list[str]]:
        """The reference captions of each sample, by its image_id."""
        self.scst_scorer()
        path, refs, _ = self.__dict__["_scst_state"]
        keys = [sample_key(i) for i in image_ids]
        missing = [k for k in keys if k not in refs]
        if missing:
            raise KeyError(
                f"scst_references {path} has no references for image_id {missing[0]!r}"
                f"{f' (and {len(missing) - 1} more in this batch)' if len(missing) > 1 else ''}; it holds "
                f"{len(refs)} images. Samples carry the dataset's image_id (LAVIS: a dense index): build the "
                f"file from the training dataset (python -m lavis_evlgen.models.scst --cfg-path CFG --out FILE)"
            )
        return [refs[k] for k in keys]

    def scst_rewards(self, captions: list[str], refs: list[list[str]]) -> torch.Tensor:
        """CIDEr-D of each caption against its references: float tensor [len(captions)]."""
        return torch.as_tensor(self.scst_scorer().score(captions, refs), dtype=torch.float32)

    # ------------------------------------------------------------ decoding and re-scoring
    def _scst_prompt_tokens(self, prompts: list[str], device):
        self.tokenizer.padding_side = "left"
        tokens = self.tokenizer(prompts, return_tensors="pt", padding="longest").to(device)
        return tokens.input_ids.long(), tokens.attention_mask

    def _scst_inputs(self, prefix, prompt_ids, prompt_mask, caption_ids=None, caption_mask=None):
        """inputs_embeds, attention_mask and position_ids of [soft prompts, left-padded prompt, caption]."""
        prefix_mask = torch.ones(prefix.shape[:2], dtype=prompt_mask.dtype, device=prefix.device)
        parts, masks = [prefix, self._embed_tokens(prompt_ids)], [prefix_mask, prompt_mask]
        if caption_ids is not None:
            parts.append(self._embed_tokens(caption_ids))
            masks.append(caption_mask.to(prompt_mask.dtype))
        attention_mask = torch.cat(masks, dim=1)
        # As generate() derives them from the attention mask (left padding skipped).
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        return torch.cat(parts, dim=1), attention_mask, position_ids

    @torch.no_grad()
    def scst_decode(self, prefix: torch.Tensor, prompt_ids, prompt_mask) -> torch.Tensor:
        """A group of ``scst_group_size`` captions per image: generated ids [B * k, L] (new tokens only)."""
        cfg = self.config
        k = cfg.scst_group_size
        if cfg.scst_decoding == "sample":
            decoding = dict(do_sample=True, num_beams=1, temperature=cfg.scst_temperature, top_p=cfg.scst_top_p,
                            top_k=cfg.scst_top_k)
        else:
            decoding = dict(do_sample=False, num_beams=k, length_penalty=1.0)
        inputs_embeds, attention_mask, _ = self._scst_inputs(prefix.detach(), prompt_ids, prompt_mask)
        with self.maybe_autocast():
            return self.llm.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                eos_token_id=self.stop_token_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                max_new_tokens=cfg.scst_max_len,
                min_new_tokens=cfg.scst_min_len,
                num_return_sequences=k,
                repetition_penalty=1.0,
                **decoding,
            )

    def scst_sequence_logprobs(self, prefix, prompt_ids, prompt_mask, caption_ids, caption_mask):
        """Length-normalised log-probabilities of captions after soft prompts and prompts (teacher forced).

        Args:
            prefix: [N, P, D] soft prompts (differentiable); prompt_ids/prompt_mask: [N, Q] left-padded;
            caption_ids: [N, L]; caption_mask: bool [N, L], the tokens that count (at least one per row).
        Returns:
            ([N] mean token log-prob of each caption, [N, L] per-token log-probs, zero where masked).
        """
        inputs_embeds, attention_mask, position_ids = self._scst_inputs(
            prefix, prompt_ids, prompt_mask, caption_ids, caption_mask
        )
        length = caption_ids.size(1)
        # Logits at positions -L-1 .. -2 predict the caption's L tokens; LLMs that can skip the others do.
        keep = {"logits_to_keep": length + 1} if "logits_to_keep" in inspect.signature(self.llm.forward).parameters else {}
        with self.maybe_autocast():
            logits = self.llm(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **keep
            ).logits[:, -length - 1 : -1]
        token_logprobs = -F.cross_entropy(
            logits.float().transpose(1, 2), caption_ids, reduction="none"
        ) * caption_mask
        return token_logprobs.sum(1) / caption_mask.sum(1).clamp(min=1), token_logprobs

    # ------------------------------------------------------------ the step
    def scst_step(self, samples: dict) -> dict:
        """One SCST step's pieces: loss, rewards, advantages, captions, ids, log-probs (see module doc)."""
        cfg = self.config
        if "image_id" not in samples:
            raise KeyError("SCST needs samples['image_id'] to find each image's references in scst_references")
        refs = self.scst_references_for(samples["image_id"])
        prefix = self.encode_visual(samples)
        batch, k, device = prefix.size(0), cfg.scst_group_size, prefix.device
        if len(refs) != batch:
            raise ValueError(f"{len(refs)} image_ids for a batch of {batch} images")
        prompt = samples.get("prompt", cfg.prompt)
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)

        prompt_ids, prompt_mask = self._scst_prompt_tokens(prompts, device)
        caption_ids = self.scst_decode(prefix, prompt_ids, prompt_mask)
        caption_mask = caption_token_mask(caption_ids, self.stop_token_ids)
        text_mask = caption_mask & ~torch.isin(
            caption_ids, torch.as_tensor(self.stop_token_ids, device=caption_ids.device)
        )
        captions = [
            self.tokenizer.decode(ids[keep], skip_special_tokens=True).strip()
            for ids, keep in zip(caption_ids, text_mask)
        ]
        group_refs = [r for r in refs for _ in range(k)]
        rewards = self.scst_rewards(captions, group_refs).to(device)

        logprobs, _ = self.scst_sequence_logprobs(
            prefix.repeat_interleave(k, 0),
            prompt_ids.repeat_interleave(k, 0),
            prompt_mask.repeat_interleave(k, 0),
            caption_ids,
            caption_mask,
        )
        loss, advantage = scst_objective(logprobs, rewards, k)
        return {
            "loss": loss, "rewards": rewards, "advantage": advantage, "captions": captions,
            "caption_ids": caption_ids, "caption_mask": caption_mask, "logprobs": logprobs,
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        }

    def scst_loss(self, samples: dict) -> dict:
        """{"loss", "loss_scst": the SCST loss; "reward": mean CIDEr-D of the groups (no grad)}."""
        step = self.scst_step(samples)
        return {"loss": step["loss"], "loss_scst": step["loss"], "reward": step["rewards"].mean()}


# ---------------------------------------------------------------------- CLI: the references file
def write_config_references(cfg_path, out, options=(), split: str = "train") -> dict[str, list[str]]:
    """Write the references file of the ``split`` dataset a LAVIS config (layered, ``base:``) plus
    ``options`` builds; returns it. ValueError naming the config when it has not exactly one."""
    import lavis.tasks as tasks

    from lavis_evlgen.common.run_config import RunConfig  # importing lavis_evlgen registers the builders and tasks

    cfg = RunConfig(argparse.Namespace(cfg_path=str(cfg_path), options=list(options)))
    datasets = tasks.setup_task(cfg).build_datasets(cfg)
    chosen = [d[split] for d in datasets.values() if split in d]
    if len(chosen) != 1:
        raise ValueError(f"{cfg_path}: need exactly one dataset with a {split!r} split, found {len(chosen)}")
    return write_scst_references(chosen[0], out)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write the SCST references file {image_id: [captions]} of a LAVIS config's training "
        "dataset(s), keyed as its samples' image_id."
    )
    parser.add_argument("--cfg-path", required=True, help="a LAVIS config (datasets + run.task; layered with base:)")
    parser.add_argument("--out", required=True, help="the JSON file to write (model.scst_references)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--options", nargs="+", default=[], help="LAVIS key=value overrides")
    args = parser.parse_args(argv)
    try:
        refs = write_config_references(args.cfg_path, args.out, args.options, args.split)
    except ValueError as error:
        raise SystemExit(str(error)) from error
    print(f"{args.out}: references of {len(refs)} images ({sum(map(len, refs.values()))} captions)")


if __name__ == "__main__":
    main()
