"""Where does the image's content survive? Linear probes along an EVLGen model's path.

For shapes-world images, a linear classifier is fitted on train-image features and scored on val
images, at each stage of the model: every layer of the frozen ViT (the HF encoder's hidden states,
mean over patch tokens), the tokens the connector receives (after ``ln_vision``), the connector's
output and the soft prompts the LLM reads (each mean over tokens). Targets per image:

- colour set: which of the 6 colours appear (6 binary labels; scored as exact set match);
- shape set: which of the 4 shapes appear (exact set match);
- count: 1, 2 or 3 objects (3 classes).

A stage where a probe fails cannot pass that content on; the first stage where it drops is where
it is lost. Trained parts are probed with the weights of ``checkpoint`` (untrained without one).

``supervised_connector``: a second question. Can the connector *learn* to pass colour, shape and
colour-shape pairs within the main job's step budget when it is told what to pass? It trains the
model's trainable parts (connector, projections) with binary cross-entropy from linear heads on the
soft prompts' mean to the scene's colour, shape and pair sets, at the caption job's per-process batch and lr,
and reports val F1 every ``every`` steps. If it can, the caption loss, not the visual path, is what
fails to teach colour (README, "Where colour is lost").

``text_ceiling``: a third. Given the scene *as text* in its context, the list its pretraining corpus
pairs with captions (``text_lm.scene_text``), what does the model's frozen LLM say? The list names
every object's colour and shape, so its colour/shape/pair scores are what the LLM does with perfect
information about them: a practical ceiling for the trained model (not a proof: soft prompts are
not text, and could carry what the list leaves out, such as positions).
"""
import json
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from lavis_evlgen.assets.text_lm import scene_text
from lavis_evlgen.datasets.scene_scores import score_captions_against_scenes
from lavis_evlgen.datasets.shapes_datasets import read_held_out_pairs
from lavis_evlgen.datasets.shapes_world import COLORS, SHAPES

TARGETS = ("colour set", "shape set", "count")
PAIRS = tuple((colour, shape) for colour in COLORS for shape in SHAPES)


def scene_labels(scenes: list[dict]) -> dict[str, torch.Tensor]:
    """Probe targets of a list of scenes: colour/shape sets [N, 6]/[N, 4] (0/1), count [N] (0..2)."""
    def present(names, key):
        return torch.tensor([[name in {o[key] for o in s["objects"]} for name in names] for s in scenes]).float()

    return {"colour set": present(COLORS, "color"), "shape set": present(SHAPES, "shape"),
            "count": torch.tensor([len(s["objects"]) - 1 for s in scenes])}


@torch.no_grad()
def stage_features(model, images: torch.Tensor, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Mean-pooled features of ``images`` [N, 3, H, W] at each stage: {stage name: [N, C]}."""
    encoder = model.visual_encoder.model  # the HF vision transformer (Dinov2, ViT)
    stages = {}
    for start in tqdm(range(0, len(images), batch_size), desc="probe features", unit="batch"):
        batch = images[start:start + batch_size]
        out = encoder(pixel_values=batch, output_hidden_states=True)
        hidden = out.hidden_states[1:]  # the output of each block the encoder runs
        named = {f"ViT layer {i + 1}": h[:, 1:].mean(1) for i, h in enumerate(hidden)}
        vision_tokens = model.ln_vision(model.visual_encoder(batch))  # what the model feeds its connector
        merged, _ = model.connect(vision_tokens)
        named.update({"ln_vision (connector input)": vision_tokens[:, 1:].mean(1),
                      "connector output": merged.mean(1), "soft prompts": model.llm_proj(merged).mean(1)})
        for name, value in named.items():
            stages.setdefault(name, []).append(value.float())
    return {name: torch.cat(values) for name, values in stages.items()}


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                   steps: int = 300, seed: int = 0) -> float:
    """Val accuracy (%) of a linear probe fitted with Adam on standardised features.

    ``train_y`` float [N, K] -> K binary labels, scored as exact match of all K; long [N] -> classes.
    """
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    multilabel = train_y.dtype.is_floating_point
    outputs = train_y.shape[1] if multilabel else int(train_y.max()) + 1
    probe = torch.nn.Linear(train_x.shape[1], outputs)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits if multilabel else torch.nn.functional.cross_entropy
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss_fn(probe(train_x), train_y).backward()
            optimizer.step()
    with torch.no_grad():
        logits = probe(val_x)
        correct = ((logits > 0).float() == val_y).all(1) if multilabel else logits.argmax(1) == val_y
    return 100.0 * correct.float().mean().item()


def load_split(world: Path, split: str, count: int, vis_processor) -> tuple[torch.Tensor, list[dict]]:
    """The first ``count`` images of a split through ``vis_processor``: ([N, 3, H, W], their scenes)."""
    scenes = json.loads((world / f"scenes_{split}.json").read_text())[:count]
    images = torch.stack([vis_processor(Image.open(world / s["image"]).convert("RGB")) for s in scenes])
    return images, scenes


def probe_model(model, vis_processor, world: Path, num_train: int = 800, num_val: int = 200) -> dict:
    """Probe accuracies {stage: {target: val accuracy %}} plus the majority-class baseline as stage "chance"."""
    model.eval()
    train_images, train_scenes = load_split(world, "train", num_train, vis_processor)
    val_images, val_scenes = load_split(world, "val", num_val, vis_processor)
    train_y, val_y = scene_labels(train_scenes), scene_labels(val_scenes)
    train_f, val_f = stage_features(model, train_images), stage_features(model, val_images)
    results = {"chance": {}}
    for target in TARGETS:
        y = train_y[target]
        keys = [tuple(row.tolist()) for row in y] if y.dtype.is_floating_point else y.tolist()
        majority = max(set(keys), key=keys.count)
        val_keys = [tuple(row.tolist()) for row in val_y[target]] if y.dtype.is_floating_point else val_y[target].tolist()
        results["chance"][target] = 100.0 * sum(k == majority for k in val_keys) / len(val_keys)
    for stage in train_f:
        results[stage] = {target: probe_accuracy(train_f[stage], train_y[target], val_f[stage], val_y[target])
                          for target in TARGETS}
    return results


def set_targets(scenes: list[dict]) -> torch.Tensor:
    """Colour, shape and colour-shape pair sets of each scene, concatenated: [N, 6 + 4 + 24] (0/1)."""
    labels = scene_labels(scenes)
    pairs = torch.tensor([[pair in {(o["color"], o["shape"]) for o in s["objects"]} for pair in PAIRS]
                          for s in scenes]).float()
    return torch.cat([labels["colour set"], labels["shape set"], pairs], 1)


def set_f1(predicted: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Micro F1 (%) of predicted 0/1 sets [N, 34] (``set_targets``' layout) per group: colour, shape, pair."""
    groups = {"colour F1": slice(0, len(COLORS)), "shape F1": slice(len(COLORS), len(COLORS) + len(SHAPES)),
              "pair F1": slice(len(COLORS) + len(SHAPES), None)}
    out = {}
    for name, cols in groups.items():
        p, t = predicted[:, cols], truth[:, cols]
        out[name] = 100.0 * 2 * (p * t).sum().item() / max((p.sum() + t.sum()).item(), 1.0)
    return out


def supervised_connector(model, vis_processor, world: Path, steps: int = 300, every: int = 100, lr: float = 1e-4,
                         head_lr: float = 1e-3, batch_size: int = 16, num_train: int = 2000, num_val: int = 200,
                         seed: int = 0) -> list[dict]:
    """Train the trainable parts + linear heads on the soft prompts' mean [B, D_llm] to the scene sets.

    The ViT is frozen, so its tokens [N, T, C] are computed once. Returns one row per ``every``
    steps: {"step", "loss", "colour F1", "shape F1", "pair F1"} on the first ``num_val`` val images.
    """
    train_images, train_scenes = load_split(world, "train", num_train, vis_processor)
    val_images, val_scenes = load_split(world, "val", num_val, vis_processor)
    with torch.no_grad():
        model.eval()
        train_tokens, val_tokens = (torch.cat([model.visual_encoder(x[i:i + 32]) for i in range(0, len(x), 32)])
                                    for x in (train_images, val_images))
    train_y, val_y = set_targets(train_scenes), set_targets(val_scenes)
    generator = torch.Generator().manual_seed(seed)

    def pooled(tokens):
        merged, _ = model.connect(model.ln_vision(tokens))
        return model.llm_proj(merged).mean(1)

    head = torch.nn.Linear(model.llm.config.hidden_size, train_y.shape[1])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": trainable, "lr": lr}, {"params": head.parameters(), "lr": head_lr}],
                                  weight_decay=0.05)
    rows = []
    model.train()
    for step in tqdm(range(1, steps + 1), desc="supervised connector", unit="step"):
        idx = torch.randint(len(train_tokens), (batch_size,), generator=generator)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(pooled(train_tokens[idx])), train_y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0:
            model.eval()
            with torch.no_grad():
                predicted = torch.cat([(head(pooled(val_tokens[i:i + 50])) > 0).float() for i in range(0, len(val_tokens), 50)])
            model.train()
            rows.append({"step": step, "loss": loss.item(), **set_f1(predicted, val_y)})
    model.eval()
    return rows


@torch.no_grad()
def text_ceiling(model, world: Path, split: str = "val", num_images: int = 200, batch_size: int = 50,
                 seed: int = 0, **generate_kwargs) -> dict[str, float]:
    """``score_captions_against_scenes`` of what ``model.llm`` writes after each scene's ``scene_text``
    (no image, no soft prompt), decoded as the model decodes (its stop tokens; ``generate_kwargs``
    such as ``num_beams`` passed on), for the first ``num_images`` images of ``split``."""
    import random

    scenes = json.loads((Path(world) / f"scenes_{split}.json").read_text())[:num_images]
    rng = random.Random(seed)
    contexts = [scene_text(s["objects"], rng) + "\n" for s in scenes]
    tokenizer, captions = model.tokenizer, {}
    tokenizer.padding_side = "left"
    model.eval()
    for start in tqdm(range(0, len(scenes), batch_size), desc=f"text ceiling ({split})", unit="batch"):
        batch = tokenizer(contexts[start:start + batch_size], return_tensors="pt", padding="longest")
        output = model.llm.generate(**batch, eos_token_id=model.stop_token_ids, pad_token_id=tokenizer.pad_token_id,
                                    **generate_kwargs)
        texts = tokenizer.batch_decode(output[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
        captions.update({int(s["image_id"]): t.strip() for s, t in zip(scenes[start:], texts)})
    return score_captions_against_scenes(captions, {int(s["image_id"]): s["objects"] for s in scenes},
                                         read_held_out_pairs(Path(world) / "world.json"))


@torch.no_grad()
def shape_copy_probability(model, world: Path, split: str = "val", num_images: int = 60, seed: int = 0) -> dict[str, float]:
    """Does the frozen LLM bind a shape to its colour from the scene list in its context? For each
    object of the first ``num_images`` scenes, the LLM reads "a picture with {n shapes}, a {colour}"
    with and without the scene's ``scene_text`` before it; returns the mean probability of the
    object's shape among the world's shape words, {"with list", "without list", "objects"}. Chance
    is 1 / len(SHAPES); "with list" near "without list" means the LLM does not copy the shape."""
    import random

    scenes = json.loads((Path(world) / f"scenes_{split}.json").read_text())[:num_images]
    shape_ids = [model.tokenizer(" " + shape, add_special_tokens=False).input_ids[-1] for shape in SHAPES]
    counts = {1: "a single shape", 2: "two shapes", 3: "three shapes"}
    rng, model_ = random.Random(seed), model.llm.eval()
    sums = {"with list": 0.0, "without list": 0.0}
    objects = 0
    for scene in scenes:
        context = scene_text(scene["objects"], rng) + "\n"
        for obj in scene["objects"]:
            caption = f"a picture with {counts[len(scene['objects'])]}, a {obj['color']}"
            for key, text in (("with list", context + caption), ("without list", caption)):
                ids = model.tokenizer(text, return_tensors="pt").input_ids
                p = model_(ids).logits[0, -1, shape_ids].softmax(-1)
                sums[key] += p[SHAPES.index(obj["shape"])].item()
            objects += 1
    return {**{k: v / max(objects, 1) for k, v in sums.items()}, "objects": objects}
