"""A tiny, seeded, offline "shapes video world": short real mp4 clips in LAVIS's video-caption format.

Each clip (``num_frames`` frames of ``frame_size`` px at ``fps``, h264 in mp4) shows one or two
flat shapes of the image world (``shapes_world``: its colours, shapes, sizes, background and
polygons) on a still background. Every shape does one thing, gradually, during a time window:

- moves ``left`` / ``right`` / ``up`` / ``down`` (by 20-35% of the frame side),
- ``appear``s (grows from nothing to full size) or ``disappear``s (shrinks to nothing),
- ``change``s colour (the new colour wipes over the shape from top to bottom).

A clip is ``single`` (one shape, its event spans the clip), a ``sequence`` (two shapes: the first
acts in the first half of the clip, the second in the second half) or ``simultaneous`` (two
shapes acting over the whole clip). The halves are exactly the halves LAVIS's "headtail" sampling
draws two frames each from, and every event is gradual, so any two distinct frames of a window
show which way it goes: uniform and headtail samples of 4 frames both see every event and the
order of a sequence. No single frame does: a half-grown shape may be appearing or disappearing,
a two-coloured one may be turning either way, and a position says nothing of the direction.

Each clip gets five captions worded differently (``write_video_captions``), each naming every
shape (colour and shape), what it does (direction, appearing, disappearing, the new colour) and,
for two shapes, the temporal relation ("..., then ...", "... after ...", "... while ...").

The test split measures compositional generalisation over events: four (shape, action) pairs
(``HELD_OUT_EVENTS``, one per shape, four different actions, the same for every seed) never occur
in train or val, and every test clip holds at least one of them. The same seed gives
byte-identical files with the same PyAV/libx264 build; nothing here touches the network.

Layout of a generated world (all paths in annotations are relative to the root)::

    world.json                         manifest: version, seed, counts, clip format, held-out events
    videos/{split}/{video_id:06d}.mp4  h264, yuv420p, [num_frames, frame_size, frame_size]
    scenes_{split}.json                per clip: structure and its events, shape by shape
    captions_{split}.json              train: one record per caption; val/test: refs list

Caption records are LAVIS's video-caption records: {"video": path, "caption": str | [str],
"image_id": int} ("image_id" is the clip's id, as LAVIS's video datasets name it).

Run ``python -m lavis_evlgen.datasets.shapes_video OUT_DIR`` to write one by hand.
"""
import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from lavis_evlgen.common.paths import cache_root
from lavis_evlgen.datasets.shapes_world import (
    COLOR_JITTER,
    COLORS,
    MAX_ROTATION,
    SHAPES,
    SIZES,
    SPLITS,
    _polygon,
    _with_article,
    ensure_generated,
    render_scene,
)

# Bump whenever the generator's output changes: the cache directory name carries it.
VERSION = 1
CAPTIONS_PER_CLIP = 5

DIRECTIONS = ("left", "right", "up", "down")
ACTIONS = DIRECTIONS + ("appear", "disappear", "change")
# Unit steps in image coordinates (y points down).
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
# How far a shape moves during its window, as a fraction of the frame side. The least room a cell
# leaves (a large shape across a half frame: 0.5 - 2 * (0.12 + MARGIN) = 0.21) is above the minimum.
DISPLACEMENT = (0.2, 0.35)
# Free space kept between a shape's path and the edge of its cell (frame edge or the other half).
MARGIN = 0.025

STRUCTURES = ("single", "sequence", "simultaneous")
STRUCTURE_WEIGHTS = (0.3, 0.4, 0.3)
NUM_EVENTS = {"single": 1, "sequence": 2, "simultaneous": 2}

# The (shape, action) pairs kept out of train/val: one per shape, four different actions, the same
# for every seed (as shapes_world.HELD_OUT_PAIRS), so "test = unseen events" holds across seeds.
HELD_OUT_EVENTS = (("circle", "up"), ("square", "disappear"), ("triangle", "change"), ("star", "left"))

# What a shape does, three ways, each as (finite, gerund): "a red circle moves left", "a clip of a
# red circle moving left". "{color}" is the new colour of a change. No punctuation but commas:
# LAVIS's blip_caption processor would strip it from train text only.
VERB_PHRASES = {
    "left": (("moves left", "moving left"), ("slides to the left", "sliding to the left"),
             ("goes left", "going left")),
    "right": (("moves right", "moving right"), ("slides to the right", "sliding to the right"),
              ("goes right", "going right")),
    "up": (("moves up", "moving up"), ("slides upward", "sliding upward"), ("goes up", "going up")),
    "down": (("moves down", "moving down"), ("slides downward", "sliding downward"),
             ("goes down", "going down")),
    "appear": (("appears", "appearing"), ("shows up", "showing up"), ("comes into view", "coming into view")),
    "disappear": (("disappears", "disappearing"), ("vanishes", "vanishing"), ("goes away", "going away")),
    "change": (("turns {color}", "turning {color}"), ("changes to {color}", "changing to {color}"),
               ("becomes {color}", "becoming {color}")),
}
# Caption frames per structure, five each, every one used once per clip so the five references
# differ. {a}/{b}: finite clauses ("a red circle moves left"); {a_ing}: gerund phrase ("a red
# circle moving left"). In a sequence {a} is the first event in time, {b} the second; in a
# simultaneous clip they are the two events in either order.
CAPTION_FRAMES = {
    "single": ("{a}", "in this video {a}", "a clip of {a_ing}", "a video showing {a_ing}", "we see {a_ing}"),
    "sequence": ("{a}, then {b}", "first {a}, then {b}", "{a} and then {b}", "{b} after {a}",
                 "{a}, after that {b}"),
    "simultaneous": ("{a} while {b}", "{a} and at the same time {b}", "at the same time {a} and {b}",
                     "{a} and {b} at the same time", "while {a}, {b}"),
}


def event_windows(structure: str, num_frames: int) -> list[tuple[int, int]]:
    """The [start, end) frame window of each event of a clip, in event order.

    A sequence splits at ``num_frames // 2``, the split LAVIS's headtail sampling uses.
    """
    half = num_frames // 2
    return {"single": [(0, num_frames)], "sequence": [(0, half), (half, num_frames)],
            "simultaneous": [(0, num_frames), (0, num_frames)]}[structure]


def progress(window: list[int] | tuple[int, int], frame: int) -> float:
    """How far an event is at ``frame``: 0 at the window's first frame (and before), 1 at its last
    (and after), linear in between."""
    start, end = window
    return min(1.0, max(0.0, (frame - start) / (end - 1 - start)))


def _sample_events(rng: random.Random, num_events: int, test: bool) -> list[dict]:
    """(shape, action, colour, new colour) of each event: distinct shapes, and every colour a clip
    names (shapes' colours and new colours) distinct. Train/val avoid the held-out (shape, action)
    pairs; a test clip's first drawn event is one of them (its place in time is shuffled later)."""
    pairs = [rng.choice(HELD_OUT_EVENTS)] if test else []
    while len(pairs) < num_events:
        candidates = [(shape, action) for shape in SHAPES for action in ACTIONS
                      if all(shape != s for s, _ in pairs) and (test or (shape, action) not in HELD_OUT_EVENTS)]
        pairs.append(rng.choice(candidates))
    colors = rng.sample(list(COLORS), num_events)
    events = []
    for (shape, action), color in zip(pairs, colors):
        to_color = None
        if action == "change":
            to_color = rng.choice([c for c in COLORS if c not in colors and all(c != e["to_color"] for e in events)])
        events.append({"color": color, "shape": shape, "action": action, "to_color": to_color})
    return events


def _cells(events: list[dict], rng: random.Random) -> list[tuple[float, float, float, float]]:
    """(x0, x1, y0, y1) fractions of the frame each shape stays in: the whole frame for one shape;
    for two, the top/bottom halves when both move sideways, the left/right halves when both move
    vertically, else either (seeded), so that paths never cross."""
    if len(events) == 1:
        return [(0.0, 1.0, 0.0, 1.0)]
    axes = {DIRECTION_VECTORS[e["action"]][0] != 0 for e in events if e["action"] in DIRECTIONS}
    side_by_side = rng.random() < 0.5
    if len(axes) == 1 and sum(e["action"] in DIRECTIONS for e in events) == 2:
        side_by_side = not axes.pop()  # both horizontal -> stacked halves, both vertical -> side by side
    if side_by_side:
        return [(0.0, 0.5, 0.0, 1.0), (0.5, 1.0, 0.0, 1.0)]
    return [(0.0, 1.0, 0.0, 0.5), (0.0, 1.0, 0.5, 1.0)]


def _place(event: dict, cell: tuple[float, float, float, float], size: str,
           rng: random.Random) -> tuple[list[float], list[float]]:
    """Start and end centre (fractions) of a shape of ``size`` in ``cell``; they differ only for a
    move, by a distance drawn from ``DISPLACEMENT`` (cut to the room the cell leaves, never under
    ``DISPLACEMENT[0]``) along its direction, with the whole path inside the cell."""
    radius = SIZES[size]
    lows = (cell[0] + radius + MARGIN, cell[2] + radius + MARGIN)
    highs = (cell[1] - radius - MARGIN, cell[3] - radius - MARGIN)
    step = DIRECTION_VECTORS.get(event["action"], (0.0, 0.0))
    distance = 0.0
    if event["action"] in DIRECTIONS:
        along = 0 if step[0] else 1
        distance = min(rng.uniform(*DISPLACEMENT), highs[along] - lows[along])
    start = []
    for axis in (0, 1):
        shift = step[axis] * distance
        start.append(rng.uniform(lows[axis] - min(0.0, shift), highs[axis] - max(0.0, shift)))
    return start, [start[0] + step[0] * distance, start[1] + step[1] * distance]


def _jittered(color: str, rng: random.Random) -> list[int]:
    """The RGB fill of a colour name, each channel moved by up to ``COLOR_JITTER`` (as the image world)."""
    return [min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in COLORS[color]]


def sample_clip(rng: random.Random, test: bool, num_frames: int, frame_size: int) -> dict:
    """Draws one clip: its structure and, per event (in time order for a sequence), the shape's
    colour, shape, action, new colour, size, pixel geometry (start/end centre, radius, rotation),
    RGB fills and frame window [start, end)."""
    structure = rng.choices(STRUCTURES, weights=STRUCTURE_WEIGHTS)[0]
    events = _sample_events(rng, NUM_EVENTS[structure], test)
    rng.shuffle(events)  # a test clip's held-out event may come first or second
    cells = _cells(events, rng)
    for event, cell, window in zip(events, cells, event_windows(structure, num_frames)):
        size = rng.choice(list(SIZES))
        start, end = _place(event, cell, size, rng)
        event.update({
            "size": size,
            "start": [round(v * frame_size, 2) for v in start],
            "end": [round(v * frame_size, 2) for v in end],
            "radius": round(SIZES[size] * frame_size, 2),
            "rotation": round(rng.uniform(-MAX_ROTATION, MAX_ROTATION), 2),
            "rgb": _jittered(event["color"], rng),
            "to_rgb": _jittered(event["to_color"], rng) if event["to_color"] else None,
            "window": list(window),
        })
    return {"structure": structure, "events": events}


def shape_state(event: dict, frame: int) -> dict | None:
    """What of an event's shape is drawn at ``frame``: {"center": [x, y], "radius": px,
    "rgb": old fill, "to_rgb": new fill or None, "wipe": y (px) above which the new fill shows,
    or None}; None when the shape is not visible (under half a pixel)."""
    p = progress(event["window"], frame)
    (x0, y0), (x1, y1) = event["start"], event["end"]
    radius = event["radius"] * {"appear": p, "disappear": 1.0 - p}.get(event["action"], 1.0)
    if radius < 0.5:
        return None
    center = [x0 + p * (x1 - x0), y0 + p * (y1 - y0)]
    # From one pixel above the shape (p = 0: all old) to one below it (p = 1: all new).
    wipe = center[1] - radius - 1 + (2 * radius + 2) * p if event["action"] == "change" else None
    return {"center": center, "radius": radius, "rgb": event["rgb"], "to_rgb": event["to_rgb"], "wipe": wipe}


def _shape_mask(shape: str, center: list[float], radius: float, rotation: float, frame_size: int) -> np.ndarray:
    """Pixels of a shape, drawn as ``shapes_world.render_scene`` draws it: bool [S, S]."""
    mask = Image.new("L", (frame_size, frame_size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        (x, y), r = center, radius
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    else:
        draw.polygon(_polygon(shape, center, radius, rotation), fill=255)
    return np.asarray(mask) > 0


def render_clip(clip: dict, background: np.ndarray, num_frames: int) -> np.ndarray:
    """Paints every frame of a clip over a still background [S, S, 3] -> uint8 [T, S, S, 3]."""
    frame_size = background.shape[0]
    rows = np.arange(frame_size)[:, None] + 0.5  # pixel centres, [S, 1]
    frames = np.repeat(background[None], num_frames, axis=0)
    for t in range(num_frames):
        for event in clip["events"]:
            state = shape_state(event, t)
            if state is None:
                continue
            mask = _shape_mask(event["shape"], state["center"], state["radius"], event["rotation"], frame_size)
            frames[t][mask] = state["rgb"]
            if state["wipe"] is not None:
                frames[t][mask & (rows < state["wipe"])] = state["to_rgb"]
    return frames


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Writes uint8 RGB frames [T, H, W, 3] (H, W even) as h264 (libx264, yuv420p, crf 18) in mp4.

    One encoder thread: x264's output depends on its thread count, and the same frames must give
    the same bytes on any machine with the same PyAV build.
    """
    try:
        import av
    except ImportError as error:
        raise ImportError("writing the shapes video world needs PyAV: pip install av -c constraints.txt") from error
    num_frames, height, width, _ = frames.shape
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18", "preset": "medium",
                                                                    "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _clause(event: dict, variant: int, gerund: bool) -> str:
    """"a red circle moves left" (or "... moving left" when ``gerund``) with verb phrase ``variant``."""
    verb = VERB_PHRASES[event["action"]][variant][int(gerund)].format(color=event["to_color"])
    return f"{_with_article(event['color'] + ' ' + event['shape'])} {verb}"


def write_video_captions(clip: dict, rng: random.Random) -> list[str]:
    """Five differently worded references; each names every shape's colour, shape and event and,
    for two events, their temporal relation."""
    structure, events = clip["structure"], clip["events"]
    frames = list(CAPTION_FRAMES[structure])
    rng.shuffle(frames)
    captions = []
    for frame in frames[:CAPTIONS_PER_CLIP]:
        ordered = rng.sample(events, len(events)) if structure == "simultaneous" else events
        slots = {}
        for name, event in zip("ab", ordered):
            variant = rng.randrange(len(VERB_PHRASES[event["action"]]))
            slots[name], slots[f"{name}_ing"] = _clause(event, variant, False), _clause(event, variant, True)
        captions.append(frame.format(**slots))
    return captions


def _dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def manifest(seed: int, num_train: int, num_val: int, num_test: int, num_frames: int, frame_size: int,
             fps: int) -> dict:
    """The world.json content a world with these settings has (raises ValueError on bad settings)."""
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    for name, n in {"num_train": num_train, "num_val": num_val, "num_test": num_test}.items():
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if not isinstance(num_frames, int) or num_frames < 8:
        raise ValueError(f"num_frames must be an int >= 8 (two events of >= 4 frames each), got {num_frames!r}")
    if not isinstance(frame_size, int) or frame_size < 64 or frame_size % 2:
        raise ValueError(f"frame_size must be an even int >= 64 (h264 yuv420p; shapes need pixels), "
                         f"got {frame_size!r}")
    if not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive int, got {fps!r}")
    return {
        "name": "shapes_video", "version": VERSION, "seed": seed,
        "counts": {"train": num_train, "val": num_val, "test": num_test},
        "num_frames": num_frames, "frame_size": frame_size, "fps": fps,
        "video_format": "mp4, h264 (libx264 crf 18), yuv420p",
        "captions_per_clip": CAPTIONS_PER_CLIP,
        "held_out_events": [list(pair) for pair in HELD_OUT_EVENTS],
        "colors": list(COLORS), "shapes": list(SHAPES), "actions": list(ACTIONS), "structures": list(STRUCTURES),
    }


def generate_shapes_video(root: Path, seed: int = 0, num_train: int = 1000, num_val: int = 100, num_test: int = 100,
                          num_frames: int = 16, frame_size: int = 112, fps: int = 4) -> Path:
    """Writes a complete video world into ``root`` (missing or empty) and returns it.

    Video ids run over all splits (train first); each clip is drawn from its own RNG seeded by
    (seed, split, index), so the output depends on nothing but the arguments (and the encoder).
    """
    info = manifest(seed, num_train, num_val, num_test, num_frames, frame_size, fps)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; the shapes video world needs an empty or missing directory")

    progress_bar = tqdm(total=sum(info["counts"].values()), desc=f"shapes video world (seed {seed})", unit="clip")
    video_id = 0
    for split in SPLITS:
        (root / "videos" / split).mkdir(parents=True)
        scenes, captions = [], []
        for index in range(info["counts"][split]):
            rng = random.Random(f"shapes-video/{seed}/{split}/{index}")
            clip = sample_clip(rng, test=split == "test", num_frames=num_frames, frame_size=frame_size)
            background = np.asarray(render_scene([], rng, frame_size))
            video = f"videos/{split}/{video_id:06d}.mp4"
            write_mp4(root / video, render_clip(clip, background, num_frames), fps)
            scenes.append({"image_id": video_id, "video": video, "num_frames": num_frames, **clip})

            refs = write_video_captions(clip, rng)
            if split == "train":
                captions += [{"video": video, "caption": c, "image_id": video_id} for c in refs]
            else:
                captions.append({"video": video, "caption": refs, "image_id": video_id})
            video_id += 1
            progress_bar.update()
        _dump(scenes, root / f"scenes_{split}.json")
        _dump(captions, root / f"captions_{split}.json")
    progress_bar.close()
    # Written last: its presence marks a complete world.
    _dump(info, root / "world.json")
    return root


def shapes_video_dir(seed: int = 0, num_train: int = 1000, num_val: int = 100, num_test: int = 100,
                     num_frames: int = 16, frame_size: int = 112, fps: int = 4) -> Path:
    """Where ``ensure_shapes_video`` keeps a world with these settings under the cache root."""
    name = (f"shapes_video_s{seed}_v{VERSION}_n{num_train}-{num_val}-{num_test}"
            f"_t{num_frames}_px{frame_size}_fps{fps}")
    return cache_root() / "data" / name


def ensure_shapes_video(root: Path | None = None, seed: int = 0, num_train: int = 1000, num_val: int = 100,
                        num_test: int = 100, num_frames: int = 16, frame_size: int = 112, fps: int = 4) -> Path:
    """Returns a complete video world at ``root`` (default: ``shapes_video_dir(...)``), generating it once.

    As ``shapes_world.ensure_shapes_world``: generated into a temporary sibling renamed into place,
    under a file lock; a leftover incomplete cache directory is regenerated; a user-given ``root``
    holding something else, or a world with other settings, is an error.
    """
    settings = dict(seed=seed, num_train=num_train, num_val=num_val, num_test=num_test, num_frames=num_frames,
                    frame_size=frame_size, fps=fps)
    managed = root is None
    root = shapes_video_dir(**settings) if managed else Path(root)
    return ensure_generated(root, managed, manifest(**settings), lambda tmp: generate_shapes_video(tmp, **settings))


def _main() -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes video world.")
    parser.add_argument("root", type=Path, help="output directory (missing or empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--num-test", type=int, default=100)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--frame-size", type=int, default=112)
    parser.add_argument("--fps", type=int, default=4)
    args = parser.parse_args()
    start = time.perf_counter()
    generate_shapes_video(args.root, args.seed, args.num_train, args.num_val, args.num_test, args.num_frames,
                          args.frame_size, args.fps)
    print(f"wrote {args.root} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    _main()
