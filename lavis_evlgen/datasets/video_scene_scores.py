"""Scene-grounded caption scores for the shapes video world: what a caption says against what happened.

CIDEr and BLEU reward the words a clip's references share, and most of those words (colours,
shapes, "a", "then") can be read from a single frame. These scores check what needs the frames in
order: each stated direction of motion, appearance, disappearance and new colour, and the temporal
relation of two events, against the clip's scene (``scenes_{split}.json``). Captions are read with
the generator's own grammar (the tables of ``shapes_video``)::

    caption  = frame of the clip's structure with its clause slots    CAPTION_FRAMES
    clause   = "a"|"an" colour shape verb-phrase                       {a}, {b}: "a red circle moves left"
    gerund   = "a"|"an" colour shape gerund-phrase                     {a_ing}: "a red circle moving left"
    verb     = a VERB_PHRASES entry; "{color}" is the new colour of a change

A caption that is not exactly that is "unparseable" and read leniently: every "[a|an] colour shape
[verb-phrase]" in it, in text order; the relation of the first two from its connectives ("while",
"at the same time": simultaneous; "B after A": sequence A then B; "then", "after that", "first":
sequence in text order).

All rates are percentages in [0, 100]; a precision/recall/F1 whose denominator is 0 over the whole
split is 0.0, the conditional accuracies and ``held_out_recall`` are left out then (their ``num_*``
say why).
"""
import re
from collections import Counter
from dataclasses import dataclass

from lavis_evlgen.datasets.scene_scores import _alternatives, _precision_recall_f1, _rate, normalize_caption
from lavis_evlgen.datasets.shapes_video import CAPTION_FRAMES, DIRECTIONS, VERB_PHRASES
from lavis_evlgen.datasets.shapes_world import COLORS, SHAPES, _with_article


def _verb_table(gerund: bool) -> dict[str, tuple[str, str | None]]:
    """verb phrase -> (action, new colour or None), every "{color}" spelled out."""
    table = {}
    for action, variants in VERB_PHRASES.items():
        for variant in variants:
            phrase = variant[int(gerund)]
            if "{color}" in phrase:
                table.update({phrase.format(color=color): (action, color) for color in COLORS})
            else:
                table[phrase] = (action, None)
    return table


FINITE_VERBS, GERUND_VERBS = _verb_table(gerund=False), _verb_table(gerund=True)
VERBS = {**FINITE_VERBS, **GERUND_VERBS}
_COLOR, _SHAPE = _alternatives(COLORS), _alternatives(SHAPES)
# A clause slot of a frame, without groups (frames capture whole slots), finite or gerund.
_CLAUSE = rf"an? {_COLOR} {_SHAPE} {_alternatives(FINITE_VERBS)}"
_GERUND = rf"an? {_COLOR} {_SHAPE} {_alternatives(GERUND_VERBS)}"
# The parts of one slot's text.
CLAUSE_PARTS = re.compile(rf"(?P<article>an?) (?P<color>{_COLOR}) (?P<shape>{_SHAPE}) (?P<verb>{_alternatives(VERBS)})")
# A lenient mention anywhere: [article] colour shape [verb phrase].
MENTION = re.compile(rf"\b(?:an? )?(?P<color>{_COLOR}) (?P<shape>{_SHAPE})(?: (?P<verb>{_alternatives(VERBS)}))?\b")
SIMULTANEOUS_WORDS = re.compile(r"\b(?:while|at the same time|simultaneously|meanwhile)\b")
SEQUENCE_WORDS = re.compile(r"\b(?:then|after that|afterwards|first|before|later)\b")
REVERSING_AFTER = re.compile(r"\bafter\b(?! that)")


@dataclass(frozen=True)
class EventMention:
    """One shape a caption names: colour and shape; its action ("left", ..., "appear", "disappear",
    "change") and the new colour of a change when stated, else None."""

    color: str
    shape: str
    action: str | None = None
    to_color: str | None = None


@dataclass(frozen=True)
class ParsedVideoCaption:
    """What a caption says. ``events``: its mentions, in time order for a sequence, else in text
    order (repeats kept); ``relation``: "single", "sequence" or "simultaneous" when the caption
    says one, else None; ``parsed``: whether the whole caption is one the world's grammar writes."""

    events: tuple[EventMention, ...]
    relation: str | None
    parsed: bool


def _frame_pattern(frame: str) -> re.Pattern:
    """A caption frame as a regex capturing its clause slots as groups "a" and "b"."""
    slots = {"{a}": f"(?P<a>{_CLAUSE})", "{b}": f"(?P<b>{_CLAUSE})", "{a_ing}": f"(?P<a>{_GERUND})",
             "{b_ing}": f"(?P<b>{_GERUND})"}
    parts = re.split(r"(\{[ab](?:_ing)?\})", frame)
    return re.compile("".join(slots.get(part, re.escape(part)) for part in parts))


# (structure, frame regex): a sequence frame's slot "a" is the first event in time, wherever it stands.
FRAMES = tuple((structure, _frame_pattern(frame)) for structure, frames in CAPTION_FRAMES.items() for frame in frames)


def _slot(text: str) -> EventMention | None:
    """The event of one clause slot, or None when its article is not the generator's."""
    match = CLAUSE_PARTS.fullmatch(text)
    rest = text.partition(" ")[2]
    if match is None or text != _with_article(rest):
        return None
    action, to_color = VERBS[match.group("verb")]
    return EventMention(match.group("color"), match.group("shape"), action, to_color)


def _parse_exact(text: str) -> ParsedVideoCaption | None:
    for structure, pattern in FRAMES:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        events = [_slot(match.group(name)) for name in ("a", "b") if name in pattern.groupindex]
        if all(events):
            return ParsedVideoCaption(tuple(events), structure, parsed=True)
    return None


def _mention(match: re.Match) -> EventMention:
    verb = match.group("verb")
    action, to_color = VERBS[verb] if verb else (None, None)
    return EventMention(match.group("color"), match.group("shape"), action, to_color)


def _parse_lenient(text: str) -> ParsedVideoCaption:
    matches = list(MENTION.finditer(text))
    events = [_mention(m) for m in matches]
    relation = "single" if len(events) == 1 else None
    if len(events) >= 2:
        between = text[matches[0].end():matches[1].start()]
        if SIMULTANEOUS_WORDS.search(text):
            relation = "simultaneous"
        elif REVERSING_AFTER.search(between):  # "B after A": A came first
            relation, events[:2] = "sequence", events[1::-1]
        elif SEQUENCE_WORDS.search(text):
            relation = "sequence"
    return ParsedVideoCaption(tuple(events), relation, parsed=False)


def parse_video_caption(caption: str) -> ParsedVideoCaption:
    """Reads a caption (any case, stray whitespace) with the video world's grammar; one that fits
    no frame exactly gets ``parsed=False`` and the lenient reading (see the module docstring)."""
    text = normalize_caption(caption)
    return _parse_exact(text) or _parse_lenient(text)


def _check_ids(captions: dict, scenes: dict) -> None:
    """Every scene clip has a caption and every caption a scene; else a KeyError naming ids."""
    missing = sorted(set(scenes) - set(captions), key=str)
    extra = sorted(set(captions) - set(scenes), key=str)
    if missing:
        raise KeyError(f"{len(missing)} scene clips have no caption (first ids {missing[:5]})")
    if extra:
        raise KeyError(f"{len(extra)} captioned clip ids are not in the scenes (first ids {extra[:5]})")


def _kind(action: str) -> str:
    """The accuracy an event's action counts towards: direction, change or appearance."""
    return "direction" if action in DIRECTIONS else "change" if action == "change" else "appearance"


def _clip_counts(parsed: ParsedVideoCaption, scene: dict, held_out: set[tuple[str, str]]) -> Counter:
    """The hits and set sizes one clip adds to the split's sums."""
    events = scene["events"]
    true = {(e["color"], e["shape"]): e for e in events}
    # Per named shape, the first mention that states an action (else its first mention).
    stated: dict[tuple[str, str], EventMention] = {}
    for m in parsed.events:
        if (m.color, m.shape) not in stated or (stated[(m.color, m.shape)].action is None and m.action):
            stated[(m.color, m.shape)] = m
    counts = Counter(unparseable=not parsed.parsed)

    said_events = {(m.color, m.shape, m.action, m.to_color) for m in parsed.events if m.action}
    true_events = {(e["color"], e["shape"], e["action"], e["to_color"]) for e in events}
    for name, said_set, true_set in (
            ("color", {m.color for m in parsed.events}, {e["color"] for e in events}),
            ("pair", set(stated), set(true)),
            ("event", said_events, true_events)):
        counts.update({name: len(said_set & true_set), f"{name}_said": len(said_set), f"{name}_true": len(true_set)})

    for pair in set(stated) & set(true):
        event, mention = true[pair], stated[pair]
        right = (mention.action, mention.to_color) == (event["action"], event["to_color"])
        kind = _kind(event["action"])
        counts.update({"action": right, "action_total": 1, kind: right, f"{kind}_total": 1})

    if len(events) == 2 and set(true) <= set(stated):
        first_index = {}
        for index, m in enumerate(parsed.events):
            first_index.setdefault((m.color, m.shape), index)
        order = [first_index[(e["color"], e["shape"])] for e in events]
        right = parsed.relation == scene["structure"] and (scene["structure"] == "simultaneous" or order[0] < order[1])
        counts.update(order=right, order_total=1)

    for e in events:
        if (e["shape"], e["action"]) in held_out:
            counts.update(held_out=(e["color"], e["shape"], e["action"], e["to_color"]) in said_events,
                          held_out_true=1)
    return counts


def score_video_captions_against_scenes(captions: dict, scenes: dict[object, dict],
                                        held_out_events: list[tuple[str, str]] | None = None) -> dict[str, float]:
    """What generated captions say about clips, scored against the clips' scenes, micro-averaged.

    Args:
        captions: clip id -> one generated caption (str).
        scenes: clip id -> its scene as in ``scenes_{split}.json``: {"structure": "single" |
            "sequence" | "simultaneous", "events": [{"color", "shape", "action", "to_color"}, ...]
            (a sequence's in time order)}. Both must hold the same ids.
        held_out_events: (shape, action) pairs unseen in training, or None.

    Returns, rates in percent with hits and set sizes summed over the clips before dividing:
        {color,pair,event}_{precision,recall,f1}: per clip, the set of named shape colours (colour-shape
            pairs; full events: colour, shape, action, new colour) against the scene's.
        action_acc, num_matched_shapes: of the scene's shapes a caption names (right colour and
            shape), the share whose stated event is the true one (direction, appear/disappear, or
            change to the right colour); a named shape with no stated event counts as wrong.
        direction_acc, num_moving_matched / change_acc, num_changing_matched / appearance_acc,
            num_appearing_matched: the same, restricted to shapes that move / change colour /
            appear or disappear.
        order_acc, num_order_judged: of the two-event clips whose caption names both shapes, the
            share stating the true relation: a sequence in the right order, or simultaneity.
        held_out_recall, num_held_out_events: of the scene events with a held-out (shape, action),
            the share the caption states fully; only with ``held_out_events``.
        unparseable: captions the grammar does not fit exactly (read leniently).
        num_videos: clips scored.
        Each conditional accuracy (and held_out_recall) is present only when its count is positive.
    """
    _check_ids(captions, scenes)
    held_out = {tuple(pair) for pair in held_out_events or ()}
    totals = Counter()
    for clip_id, scene in scenes.items():
        totals += _clip_counts(parse_video_caption(captions[clip_id]), scene, held_out)

    scores = {}
    for name in ("color", "pair", "event"):
        scores.update(_precision_recall_f1(name, totals[name], totals[f"{name}_said"], totals[f"{name}_true"]))
    for name, count in (("action", "num_matched_shapes"), ("direction", "num_moving_matched"),
                        ("change", "num_changing_matched"), ("appearance", "num_appearing_matched"),
                        ("order", "num_order_judged")):
        if totals[f"{name}_total"]:
            scores[f"{name}_acc"] = _rate(totals[name], totals[f"{name}_total"])
        scores[count] = totals[f"{name}_total"]
    if held_out_events is not None:
        if totals["held_out_true"]:
            scores["held_out_recall"] = _rate(totals["held_out"], totals["held_out_true"])
        scores["num_held_out_events"] = totals["held_out_true"]
    scores.update(unparseable=totals["unparseable"], num_videos=len(scenes))
    return scores
