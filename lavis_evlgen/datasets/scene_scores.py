"""Scene-grounded caption scores for the shapes world: what a caption says against what was drawn.

CIDEr and BLEU mostly reward saying the right number of objects; these scores check each stated
colour, shape, colour-shape pair and position against the image's scene (``scenes_{split}.json``).
Captions are read with the generator's own grammar (the word tables of ``shapes_world``)::

    caption = frame with {objs} (and {count})          SINGLE_FRAMES for one object, else MULTI_FRAMES
    objs    = phrase | phrase (", " phrase)* " and " phrase
    phrase  = "a"|"an" [size word] colour shape [position phrase]

A caption that is not exactly that (a model's own wording, a missing " and ", a wrong article) is
"unparseable": its "colour shape" mentions are still read, leniently, so they are scored, not dropped.

All rates are percentages in [0, 100]; a rate whose denominator is 0 over the whole split is 0.0,
except ``position_acc`` and ``held_out_recall``, which are left out then (their ``num_*`` say why).
"""
import re
from collections import Counter
from dataclasses import dataclass

from lavis_evlgen.datasets.shapes_world import (
    COLORS,
    MULTI_FRAMES,
    NUMBER_WORDS,
    POSITION_PHRASES,
    SHAPES,
    SINGLE_FRAMES,
    SIZE_WORDS,
    _join,
    _with_article,
)

# The one count SINGLE_FRAMES spell without NUMBER_WORDS ("a picture with a single shape, ...").
SINGLE_COUNT = "a single"
# The noun count frames put after the count ("there are two shapes, ...").
COUNT_NOUN = r"shapes?"

SIZE_OF_WORD = {word: size for size, words in SIZE_WORDS.items() for word in words}
POSITION_OF_PHRASE = {phrase: position for position, phrases in POSITION_PHRASES.items() for phrase in phrases}
COUNT_OF_WORD = {**{word: n for n, word in NUMBER_WORDS.items()}, SINGLE_COUNT: 1}


def _alternatives(words) -> str:
    """A regex group matching any of ``words``, longest first so none stops at another's prefix."""
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


# One object mention without its article: [size word] colour shape [position phrase].
MENTION = re.compile(
    rf"\b(?:(?P<size>{_alternatives(SIZE_OF_WORD)}) )?(?P<color>{_alternatives(COLORS)}) "
    rf"(?P<shape>{_alternatives(SHAPES)})(?: (?P<position>{_alternatives(POSITION_OF_PHRASE)}))?\b")
STATED_COUNT = re.compile(rf"\b(?P<count>{_alternatives(COUNT_OF_WORD)}) {COUNT_NOUN}\b")


@dataclass(frozen=True)
class Mention:
    """One object a caption names: colour and shape; size ("small"/"large") and position
    ("left", ..., "center") when stated, else None."""

    color: str
    shape: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption says. ``objects``: its mentions in order (repeats kept); ``stated_count``:
    the count it spells out ("there are two shapes" -> 2, "a single shape" -> 1), else None;
    ``parsed``: whether the whole caption is one the world's grammar writes."""

    objects: tuple[Mention, ...]
    stated_count: int | None
    parsed: bool


def normalize_caption(caption: str) -> str:
    """Lower case, single spaces, no space before a comma (tokenizers may decode "shapes , a")."""
    return " ".join(caption.lower().split()).replace(" ,", ",")


def _mention(match: re.Match) -> Mention:
    size, position = match.group("size"), match.group("position")
    return Mention(match.group("color"), match.group("shape"), SIZE_OF_WORD[size] if size else None,
                   POSITION_OF_PHRASE[position] if position else None)


def _frame_pattern(frame: str) -> re.Pattern:
    """A frame as a regex: ``{objs}`` captures the object phrases, ``{count}`` a number word."""
    slots = {"{objs}": "(?P<objs>.+)", "{count}": _alternatives(NUMBER_WORDS.values())}
    return re.compile("".join(slots.get(part, re.escape(part)) for part in re.split(r"(\{objs\}|\{count\})", frame)))


# (frame regex, whether it may hold one object phrase, whether it may hold several): the generator
# picks SINGLE_FRAMES for one object, MULTI_FRAMES for more; some frames are in both.
FRAMES = tuple((_frame_pattern(frame), frame in SINGLE_FRAMES, frame in MULTI_FRAMES)
               for frame in dict.fromkeys(SINGLE_FRAMES + MULTI_FRAMES))


def _parse_objs(objs: str) -> list[Mention] | None:
    """The mentions of an object-phrase list exactly as the generator writes one, else None."""
    phrases = re.split(r", | and ", objs)
    mentions = []
    for phrase in phrases:
        rest = phrase.partition(" ")[2]
        match = MENTION.fullmatch(rest)
        # The generator's article rule ("an" before a vowel) and its join (", " ... " and ").
        if match is None or phrase != _with_article(rest):
            return None
        mentions.append(_mention(match))
    return mentions if _join(phrases) == objs else None


def _parse_exact(caption: str) -> list[Mention] | None:
    """The mentions of a normalised caption that fits a frame exactly, else None."""
    for pattern, single, multi in FRAMES:
        match = pattern.fullmatch(caption)
        mentions = _parse_objs(match.group("objs")) if match else None
        if mentions is not None and (single if len(mentions) == 1 else multi):
            return mentions
    return None


def parse_caption(caption: str) -> ParsedCaption:
    """Reads a caption (any case, stray whitespace) with the shapes world's grammar.

    A caption that fits no frame exactly gets ``parsed=False`` and the lenient reading: every
    "[size] colour shape [position]" in it. Either way the count is any "<number> shape(s)".
    """
    text = normalize_caption(caption)
    exact = _parse_exact(text)
    mentions = exact if exact is not None else [_mention(m) for m in MENTION.finditer(text)]
    count = STATED_COUNT.search(text)
    return ParsedCaption(tuple(mentions), COUNT_OF_WORD[count.group("count")] if count else None,
                         parsed=exact is not None)


def _rate(hits: int, total: int) -> float:
    """``hits / total`` in percent; 0.0 for an empty total."""
    return 100.0 * hits / total if total else 0.0


def _precision_recall_f1(name: str, hits: int, said: int, true: int) -> dict[str, float]:
    """Micro-averaged ``{name}_precision``, ``_recall``, ``_f1`` in percent from summed set sizes."""
    precision, recall = _rate(hits, said), _rate(hits, true)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {f"{name}_precision": precision, f"{name}_recall": recall, f"{name}_f1": f1}


def _check_ids(captions: dict, scenes: dict) -> None:
    """Every scene image has a caption and every caption a scene; else a KeyError naming ids."""
    missing = sorted(set(scenes) - set(captions), key=str)
    extra = sorted(set(captions) - set(scenes), key=str)
    if missing:
        raise KeyError(f"{len(missing)} scene images have no caption (first ids {missing[:5]})")
    if extra:
        raise KeyError(f"{len(extra)} captioned image ids are not in the scenes (first ids {extra[:5]})")


def _image_counts(parsed: ParsedCaption, objects: list[dict], held_out: set[tuple[str, str]]) -> Counter:
    """The hits and set sizes one image adds to the split's sums."""
    said = {(m.color, m.shape) for m in parsed.objects}
    true = {(o["color"], o["shape"]): o["position"] for o in objects}
    named = [(m.color, m.shape) for m in parsed.objects]
    counts = Counter(count=len(said) == len(objects), unparseable=not parsed.parsed, repeated=len(named) > len(said))
    for name, part in (("color", 0), ("shape", 1), ("pair", slice(None))):
        said_set, true_set = {pair[part] for pair in said}, {pair[part] for pair in true}
        counts.update({name: len(said_set & true_set), f"{name}_said": len(said_set), f"{name}_true": len(true_set)})
    # Distinct (pair, position) mentions, so a caption repeating a phrase does not count it twice.
    placed = {(m.color, m.shape, m.position) for m in parsed.objects
              if m.position is not None and (m.color, m.shape) in true}
    counts.update(position=sum(true[(color, shape)] == position for color, shape, position in placed),
                  position_said=len(placed), held_out=len(held_out & set(true) & said),
                  held_out_true=len(held_out & set(true)))
    return counts


def score_captions_against_scenes(captions: dict, scenes: dict[object, list[dict]],
                                  held_out_pairs: list[tuple[str, str]] | None = None) -> dict[str, float]:
    """What generated captions say, scored against the scenes they describe, micro-averaged.

    Args:
        captions: image_id -> one generated caption (str).
        scenes: image_id -> the image's objects, dicts with "color", "shape", "position" (as in
            ``scenes_{split}.json``). Both must hold the same ids.
        held_out_pairs: (colour, shape) pairs unseen in training, or None.

    Returns, rates in percent with hits and set sizes summed over the images before dividing:
        count_acc: images whose number of distinct mentioned colour-shape pairs is the scene's
            number of objects.
        {color,shape,pair}_{precision,recall,f1}: per image, the set of mentioned colours (shapes,
            colour-shape pairs) against the scene's.
        position_acc, num_positioned_mentions: of the distinct (colour, shape, position) mentions
            whose pair is in the scene, the share placing the object right; position_acc only when
            there is any.
        held_out_recall, num_held_out_objects: of the scene objects with a held-out pair, the share
            the caption mentions (right pair); only with ``held_out_pairs``, the recall only when
            the scenes hold any.
        unparseable: captions the grammar does not fit exactly (read leniently, see ``parse_caption``).
        repeated: captions naming one colour-shape pair more than once (the frozen mini LM's way of
            missing the count: "a red circle and a red circle" for a red circle and a blue square).
        num_images: images scored.
    """
    _check_ids(captions, scenes)
    held_out = {tuple(pair) for pair in held_out_pairs or ()}
    totals = Counter()
    for image_id, objects in scenes.items():
        totals += _image_counts(parse_caption(captions[image_id]), objects, held_out)

    scores = {"count_acc": _rate(totals["count"], len(scenes))}
    for name in ("color", "shape", "pair"):
        scores.update(_precision_recall_f1(name, totals[name], totals[f"{name}_said"], totals[f"{name}_true"]))
    if totals["position_said"]:
        scores["position_acc"] = _rate(totals["position"], totals["position_said"])
    scores["num_positioned_mentions"] = totals["position_said"]
    if held_out_pairs is not None:
        if totals["held_out_true"]:
            scores["held_out_recall"] = _rate(totals["held_out"], totals["held_out_true"])
        scores["num_held_out_objects"] = totals["held_out_true"]
    scores.update(unparseable=totals["unparseable"], repeated=totals["repeated"], num_images=len(scenes))
    return scores
