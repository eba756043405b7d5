"""A tiny, seeded, offline "shapes world" in LAVIS's COCO-caption and VQA formats.

Each image shows 1-3 flat coloured shapes (distinct colours, distinct shapes) on a light,
gently graded background. Every reference caption names the colour and shape of every object,
so a captioner that ignores the image can only guess. Each image gets five captions worded
differently and four VQA questions (count, colour, shape, position) with ten answers each.

The test split measures compositional generalisation: four colour-shape pairs (one per shape,
``HELD_OUT_PAIRS``, the same for every seed, so "test = unseen pairs" holds across seeds) never
occur in train or val, and every test image holds at least one of them. The same seed gives byte-identical files; nothing here touches the network.

Layout of a generated world (all paths in annotations are relative to the root)::

    world.json                             manifest: version, seed, counts, held-out pairs
    images/{split}/{image_id:06d}.png
    scenes_{split}.json                    what was drawn, object by object
    captions_{split}.json                  train: one record per caption; val/test: refs list
    vqa_{split}.json                       LAVIS VQA records (question_id, question, answer, image)
    vqa_{split}_questions.json             val/test: VQA-v2 question file (LAVIS's VQA scorer)
    vqa_{split}_annotations.json           val/test: VQA-v2 annotation file
    answer_list.json                       every canonical answer (LAVIS's rank inference)

Run ``python -m lavis_evlgen.datasets.shapes_world OUT_DIR`` to write one by hand.
"""
import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw
from tqdm import tqdm

from lavis_evlgen.common.paths import cache_root

# Bump whenever the generator's output changes: the cache directory name carries it.
# v2: held-out pairs fixed across seeds (seed 0's images and texts are unchanged).
VERSION = 2
SPLITS = ("train", "val", "test")
CAPTIONS_PER_IMAGE = 5

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 60, 175),
    "orange": (240, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
# Circumradius as a fraction of the image side.
SIZES = {"small": 0.075, "large": 0.12}
# Anchor centres as fractions of the image side. Any two anchors are >= 0.3 apart, more than two
# large radii plus twice the jitter (0.24 + 0.057), so shapes never overlap.
POSITIONS = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
JITTER = 0.02
COLOR_JITTER = 12
MAX_ROTATION = 15.0
NUM_OBJECTS = (1, 2, 3)
NUM_OBJECTS_WEIGHTS = (0.35, 0.35, 0.3)

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES = {
    "left": ("on the left", "at the left side", "in the left part"),
    "right": ("on the right", "at the right side", "in the right part"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle", "at the center"),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
# Every frame is used once per image, so the five references of an image always differ.
# No punctuation but commas: LAVIS's blip_caption processor would strip it from train text only.
SINGLE_FRAMES = ("{objs}", "there is {objs}", "an image of {objs}", "a picture with a single shape, {objs}",
                 "a plain background with {objs}")
MULTI_FRAMES = ("{objs}", "there are {count} shapes, {objs}", "an image of {objs}",
                "a picture with {count} shapes, {objs}", "a plain background with {objs}")
# How much of each object a caption spells out: size and/or position are optional.
PHRASE_STYLES = ("plain", "sized", "placed", "full")

QUESTION_TEMPLATES = {
    "count": ("how many shapes are there?", "how many objects are in the image?",
              "how many shapes can you see?"),
    "color": ("what color is the {shape}?", "what is the color of the {shape}?",
              "which color does the {shape} have?"),
    "shape": ("what shape is the {color} object?", "what is the {color} shape?",
              "which shape is {color}?"),
    "position": ("where is the {color} {shape}?", "in which part of the image is the {color} {shape}?",
                 "where is the {color} {shape} located?"),
}
ANSWERS_PER_QUESTION = 10
# Synonyms some "annotators" give instead of the canonical answer. None contain articles or number
# words: VQA accuracy normalises those away in predictions but not in ground truth.
ANSWER_SYNONYMS = {
    "purple": ("violet",),
    "circle": ("round",),
    "left": ("left side",),
    "right": ("right side",),
    "top": ("upper part",),
    "bottom": ("lower part",),
    "center": ("middle",),
}


# The colour-shape pairs kept out of train/val: one per shape, each with a different colour. Fixed
# for every world seed (v1 drew them from the seed, so one seed's test pairs were another's train
# pairs); these are the pairs v1 drew for seed 0, so the default world did not change.
HELD_OUT_PAIRS = (("purple", "circle"), ("yellow", "square"), ("red", "triangle"), ("green", "star"))


def sample_scene(rng: random.Random, held_out: list[tuple[str, str]], test: bool,
                 image_size: int) -> list[dict]:
    """Draws the objects of one image: colour, shape, size, position and pixel geometry.

    Colours and shapes are distinct within an image so every VQA question has one answer.
    Train/val scenes avoid the held-out pairs; test scenes start with one of them.
    """
    num_objects = rng.choices(NUM_OBJECTS, weights=NUM_OBJECTS_WEIGHTS)[0]
    positions = rng.sample(list(POSITIONS), num_objects)
    pairs = [rng.choice(held_out)] if test else []
    while len(pairs) < num_objects:
        candidates = [
            (color, shape) for color in COLORS for shape in SHAPES
            if all(color != c and shape != s for c, s in pairs) and (test or (color, shape) not in held_out)
        ]
        pairs.append(rng.choice(candidates))

    objects = []
    for (color, shape), position in zip(pairs, positions):
        size = rng.choice(list(SIZES))
        ax, ay = POSITIONS[position]
        objects.append({
            "color": color,
            "shape": shape,
            "size": size,
            "position": position,
            "center": [round((ax + rng.uniform(-JITTER, JITTER)) * image_size, 2),
                       round((ay + rng.uniform(-JITTER, JITTER)) * image_size, 2)],
            "radius": round(SIZES[size] * image_size, 2),
            "rotation": round(rng.uniform(-MAX_ROTATION, MAX_ROTATION), 2),
            "rgb": [min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in COLORS[color]],
        })
    return objects


def _polygon(shape: str, center: list[float], radius: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices of a square, upward triangle or five-pointed star (image y axis points down)."""
    if shape == "square":
        angles, radii = [45 + 90 * k for k in range(4)], [radius] * 4
    elif shape == "triangle":
        angles, radii = [-90 + 120 * k for k in range(3)], [radius] * 3
    elif shape == "star":
        angles, radii = [-90 + 36 * k for k in range(10)], [radius, 0.45 * radius] * 5
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return [(center[0] + r * math.cos(math.radians(a + rotation)),
             center[1] + r * math.sin(math.radians(a + rotation))) for a, r in zip(angles, radii)]


def render_scene(objects: list[dict], rng: random.Random, image_size: int) -> Image.Image:
    """Paints the objects over a light background with a faint linear gradient: RGB [S, S]."""
    gray = rng.uniform(200, 240)
    tint = np.array([gray + rng.uniform(-8, 8) for _ in range(3)])
    strength, angle = rng.uniform(0.0, 0.06), rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1.0, 1.0, image_size)
    grade = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]  # [S, S]
    background = tint[None, None, :] * (1.0 + strength * grade[:, :, None])  # [S, S, 3]
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), mode="RGB")

    draw = ImageDraw.Draw(image)
    for obj in objects:
        fill = tuple(obj["rgb"])
        if obj["shape"] == "circle":
            (x, y), r = obj["center"], obj["radius"]
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        else:
            draw.polygon(_polygon(obj["shape"], obj["center"], obj["radius"], obj["rotation"]), fill=fill)
    return image


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_phrase(obj: dict, style: str, rng: random.Random) -> str:
    words = [rng.choice(SIZE_WORDS[obj["size"]])] if style in ("sized", "full") else []
    phrase = _with_article(" ".join(words + [obj["color"], obj["shape"]]))
    if style in ("placed", "full"):
        phrase += " " + rng.choice(POSITION_PHRASES[obj["position"]])
    return phrase


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def write_captions(objects: list[dict], rng: random.Random) -> list[str]:
    """Five differently worded references; each names the colour and shape of every object."""
    frames = list(SINGLE_FRAMES if len(objects) == 1 else MULTI_FRAMES)
    rng.shuffle(frames)
    captions = []
    for frame in frames[:CAPTIONS_PER_IMAGE]:
        style = rng.choice(PHRASE_STYLES)
        order = rng.sample(objects, len(objects))
        objs = _join([_object_phrase(obj, style, rng) for obj in order])
        captions.append(frame.format(objs=objs, count=NUMBER_WORDS[len(objects)]))
    return captions


def _answers(canonical: str, rng: random.Random) -> list[str]:
    synonyms = ANSWER_SYNONYMS.get(canonical, ())
    num_synonyms = rng.choice((0, 1, 2)) if synonyms else 0
    answers = [canonical] * (ANSWERS_PER_QUESTION - num_synonyms)
    answers += [rng.choice(synonyms) for _ in range(num_synonyms)]
    rng.shuffle(answers)
    return answers


def write_questions(objects: list[dict], rng: random.Random) -> list[dict]:
    """One count, colour, shape and position question, each about a random object of the image."""
    questions = [{"question_type": "count", "question": rng.choice(QUESTION_TEMPLATES["count"]),
                  "canonical": str(len(objects))}]
    for question_type in ("color", "shape", "position"):
        obj = rng.choice(objects)
        template = rng.choice(QUESTION_TEMPLATES[question_type])
        questions.append({"question_type": question_type,
                          "question": template.format(color=obj["color"], shape=obj["shape"]),
                          "canonical": obj[question_type]})
    for question in questions:
        question["answer"] = _answers(question.pop("canonical"), rng)
    return questions


def _vqa_v2_files(records: list[dict], split: str) -> tuple[dict, dict]:
    """The question and annotation files LAVIS's VQA scorer (``lavis.common.vqa_tools``) reads."""
    questions = {
        "info": {"description": f"shapes world {split}"}, "task_type": "Open-Ended", "data_type": "shapes",
        "data_subtype": split, "license": {},
        "questions": [{"image_id": r["image_id"], "question": r["question"], "question_id": r["question_id"]}
                      for r in records],
    }
    # answer_type carries the question category, so the scorer reports accuracy per category.
    annotations = {"annotations": [{
        "image_id": r["image_id"], "question_id": r["question_id"], "question_type": r["question_type"],
        "answer_type": r["question_type"],
        "multiple_choice_answer": Counter(r["answer"]).most_common(1)[0][0],
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(r["answer"])],
    } for r in records]}
    return questions, annotations


def _dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _check_counts(seed: int, counts: dict[str, int], image_size: int) -> None:
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    for name, n in counts.items():
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_{name} must be a positive int, got {n!r}")
    if not isinstance(image_size, int) or image_size < 64:
        raise ValueError(f"image_size must be an int >= 64 (shapes need pixels), got {image_size!r}")


def manifest(seed: int, num_train: int, num_val: int, num_test: int, image_size: int) -> dict:
    """The world.json content a world with these settings has."""
    _check_counts(seed, {"train": num_train, "val": num_val, "test": num_test}, image_size)
    return {
        "name": "shapes_world", "version": VERSION, "seed": seed, "image_size": image_size,
        "counts": {"train": num_train, "val": num_val, "test": num_test},
        "captions_per_image": CAPTIONS_PER_IMAGE,
        "held_out_pairs": [list(pair) for pair in HELD_OUT_PAIRS],
        "colors": list(COLORS), "shapes": list(SHAPES), "sizes": list(SIZES), "positions": list(POSITIONS),
    }


def generate_shapes_world(root: Path, seed: int = 0, num_train: int = 2000, num_val: int = 200,
                          num_test: int = 200, image_size: int = 224) -> Path:
    """Writes a complete world into ``root`` (missing or empty) and returns it.

    Image ids run over all splits (train first); each image is drawn from its own RNG seeded by
    (seed, split, index), so the output does not depend on anything but the arguments.
    """
    info = manifest(seed, num_train, num_val, num_test, image_size)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; the shapes world needs an empty or missing directory")

    held_out = list(HELD_OUT_PAIRS)
    answers = sorted(set(map(str, NUM_OBJECTS)) | set(COLORS) | set(SHAPES) | set(POSITIONS))
    progress = tqdm(total=sum(info["counts"].values()), desc=f"shapes world (seed {seed})", unit="img")
    image_id = 0
    for split in SPLITS:
        (root / "images" / split).mkdir(parents=True)
        scenes, captions, questions = [], [], []
        for index in range(info["counts"][split]):
            rng = random.Random(f"shapes-world/{seed}/{split}/{index}")
            objects = sample_scene(rng, held_out, test=split == "test", image_size=image_size)
            image = f"images/{split}/{image_id:06d}.png"
            render_scene(objects, rng, image_size).save(root / image)
            scenes.append({"image_id": image_id, "image": image, "objects": objects})

            refs = write_captions(objects, rng)
            if split == "train":
                captions += [{"image": image, "caption": c, "image_id": image_id} for c in refs]
            else:
                captions.append({"image": image, "caption": refs, "image_id": image_id})
            for k, q in enumerate(write_questions(objects, rng)):
                questions.append({"question_id": image_id * 10 + k, "image_id": image_id, "image": image, **q})
            image_id += 1
            progress.update()

        _dump(scenes, root / f"scenes_{split}.json")
        _dump(captions, root / f"captions_{split}.json")
        _dump(questions, root / f"vqa_{split}.json")
        if split != "train":
            question_file, annotation_file = _vqa_v2_files(questions, split)
            _dump(question_file, root / f"vqa_{split}_questions.json")
            _dump(annotation_file, root / f"vqa_{split}_annotations.json")
    progress.close()
    _dump(answers, root / "answer_list.json")
    # Written last: its presence marks a complete world.
    _dump(info, root / "world.json")
    return root


def shapes_world_dir(seed: int = 0, num_train: int = 2000, num_val: int = 200, num_test: int = 200,
                     image_size: int = 224) -> Path:
    """Where ``ensure_shapes_world`` keeps a world with these settings under the cache root."""
    name = f"shapes_world_s{seed}_v{VERSION}_n{num_train}-{num_val}-{num_test}_px{image_size}"
    return cache_root() / "data" / name


def ensure_shapes_world(root: Path | None = None, seed: int = 0, num_train: int = 2000, num_val: int = 200,
                        num_test: int = 200, image_size: int = 224) -> Path:
    """Returns a complete world at ``root`` (default: ``shapes_world_dir(...)``), generating it once.

    Generation goes to a temporary sibling that is renamed into place, under a file lock, so
    concurrent processes (torchrun ranks, parallel tests) neither race nor see half a world.
    A leftover incomplete cache directory is regenerated; a user-given ``root`` that holds
    something else, or a world with other settings, is an error.
    """
    managed = root is None
    root = shapes_world_dir(seed, num_train, num_val, num_test, image_size) if managed else Path(root)
    return ensure_generated(root, managed, manifest(seed, num_train, num_val, num_test, image_size),
                            lambda tmp: generate_shapes_world(tmp, seed, num_train, num_val, num_test, image_size))


def ensure_generated(root: Path, managed: bool, expected: dict, generate) -> Path:
    """A complete generated world at ``root``, made once by ``generate(tmp_dir)`` if missing.

    Shared by the image and video worlds. Generation goes to a temporary sibling renamed into
    place, under a file lock, so concurrent processes neither race nor see half a world. A
    leftover incomplete ``managed`` (cache) directory is regenerated; a user-given ``root`` that
    holds something else, or a world.json other than ``expected``, is an error.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f"{root.name}.lock")):
        if (root / "world.json").is_file():
            found = json.loads((root / "world.json").read_text())
            if found != expected:
                diff = sorted(k for k in expected.keys() | found.keys() if found.get(k) != expected.get(k))
                raise ValueError(f"{root / 'world.json'} describes another world (differs in {diff}); "
                                 f"use another storage directory or delete this one")
            return root
        if root.exists():
            if not managed and any(root.iterdir()):
                raise FileExistsError(f"{root} exists without world.json; refusing to overwrite it")
            shutil.rmtree(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            generate(tmp)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _main() -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes world.")
    parser.add_argument("root", type=Path, help="output directory (missing or empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    start = time.perf_counter()
    generate_shapes_world(args.root, args.seed, args.num_train, args.num_val, args.num_test, args.image_size)
    print(f"wrote {args.root} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    _main()
