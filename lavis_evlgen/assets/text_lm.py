"""A small LLaMA-architecture LM pretrained in-house on text only (the mini world's fast LLM).

EVLGen's LLM must be pretrained on its own modality before the connector trains. Real LLMs
are too slow for a minutes-long CPU run, so the mini worlds pretrain one from scratch on the
text of their training splits (image world and video world): a byte-level BPE tokenizer fitted to
the corpus, then some thousand steps of next-token prediction. The LM never sees an image.

A real LLM arrives able to copy from its context; a 4-layer LM learns that only if its corpus asks
for it. So besides the captions, the corpus holds each train scene written as a list of what it
contains, followed by one of its captions (``scene_text``, ``scene_documents``): the LM learns to
describe what a list in its context names -- the soft prompts later take that list's place. An
image's list has one added token per object, ``<red_circle>`` (``OBJECT_TOKENS``): written in words,
"red circle", the LM copied the colours but not which shape goes with which (an induction step it
did not learn); one token makes that a lookup. Measured with
``python run_scripts/probe_mini.py --text-ceiling`` (README "Where colour is lost").
"""
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lavis_evlgen.common.prompts import VQA_PROMPT
from lavis_evlgen.datasets.shapes_world import COLORS, SHAPES

DEFAULT_LM = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=512)
# Pretraining steps of the shapes-lm asset (batch 32): ~1.8 passes over its ~53k documents. The
# shape bound to a colour in a one-token list is learned between 1500 steps (probability of the
# right shape 0.44) and 3000 (0.99; README "Where colour is lost").
LM_STEPS = 3000
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


def object_token(color: str, shape: str) -> str:
    """The added token that names one object of an image scene list: ``<red_circle>``."""
    return f"<{color}_{shape}>"


OBJECT_TOKENS = [object_token(color, shape) for color in COLORS for shape in SHAPES]


def train_tokenizer(texts: list[str], vocab_size: int, added_tokens: tuple[str, ...] = ()):
    """Fit a byte-level BPE tokenizer to ``texts`` and add ``added_tokens`` (each one id, never split);
    returns a ``PreTrainedTokenizerFast``.

    Like GPT-2's, it adds no BOS: in EVLGen the image soft prompts come first and play the part
    of the context a document starts with (see ``shapes_corpus``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_input_names=["input_ids", "attention_mask"]
    )
    tokenizer.add_tokens(list(added_tokens))
    return tokenizer


def pretrain_text_lm(
    texts: list[str],
    out_dir: Path,
    steps: int = 800,
    batch_size: int = 32,
    lr: float = 2e-3,
    vocab_size: int = 512,
    max_length: int = 64,
    seed: int = 0,
    added_tokens: tuple[str, ...] = (),
    **model_overrides,
) -> Path:
    """Pretrain a LlamaForCausalLM on ``texts`` and save it (with its tokenizer, ``train_tokenizer``
    with ``added_tokens``) to ``out_dir``.

    Each document is ``text </s>``; AdamW with linear warmup and cosine decay.
    Writes ``pretrain_log.json`` (steps, final loss, seconds) beside the weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if not texts:
        raise ValueError("pretrain_text_lm: empty corpus")
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(texts, vocab_size, added_tokens)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **{**DEFAULT_LM, **model_overrides},
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    docs = [t + tokenizer.eos_token for t in texts]
    generator = torch.Generator().manual_seed(seed)
    start, loss = time.time(), None
    model.train()
    for step in (bar := tqdm(range(steps), desc="pretraining text LM", unit="step")):
        idx = torch.randint(len(docs), (batch_size,), generator=generator).tolist()
        enc = tokenizer([docs[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log = {"steps": steps, "final_loss": loss.item(), "seconds": round(time.time() - start, 1), "documents": len(docs),
           "parameters": sum(p.numel() for p in model.parameters())}
    (out_dir / "pretrain_log.json").write_text(json.dumps(log, indent=2))
    logging.info("text LM pretrained: %s", log)
    return out_dir


def caption_documents(captions: list[dict], rng) -> list[str]:
    """Each reference caption followed by "\n" (EVLGen's caption format), and each caption followed
    by another caption of the same image or clip (records grouped by ``image_id``): the LM learns to
    describe a scene that its context describes -- the soft prompts later take that context's place."""
    from collections import defaultdict

    by_item = defaultdict(list)
    for record in captions:
        by_item[record["image_id"]].append(record["caption"])
    docs = [record["caption"] + "\n" for record in captions]
    for refs in by_item.values():
        docs += [f"{a}\n{b}\n" for a, b in zip(refs, rng.sample(refs, len(refs)))]
    return docs


def scene_text(objects: list[dict], rng) -> str:
    """A scene as a list: an image's ``objects`` in random order as ``OBJECT_TOKENS``,
    "<red_circle><blue_square>", or a clip's ``events`` in time order, in words ("purple square change
    yellow, orange triangle down"), from their ``color``, ``shape`` and, for events, ``action`` and
    ``to_color`` fields."""
    if objects and "action" in objects[0]:
        items = sorted(objects, key=lambda event: event["window"][0])
        return ", ".join(" ".join(filter(None, (e["color"], e["shape"], e["action"], e["to_color"]))) for e in items)
    return "".join(object_token(o["color"], o["shape"]) for o in rng.sample(objects, len(objects)))


def scene_documents(root: Path, rng) -> list[str]:
    """One document per train caption record: its scene's ``scene_text``, "\n", the caption, "\n".
    Reads ``captions_train.json`` and ``scenes_train.json`` of a shapes (image or video) world."""
    root = Path(root)
    scenes = {int(s["image_id"]): s.get("objects", s.get("events")) for s in json.loads((root / "scenes_train.json").read_text())}
    return [f"{scene_text(scenes[int(r['image_id'])], rng)}\n{r['caption']}\n"
            for r in json.loads((root / "captions_train.json").read_text())]


def shapes_corpus(world_root: Path, seed: int = 0) -> list[str]:
    """Text-only documents from the *train* split of a shapes world (val/test text is never used):
    ``caption_documents``, ``scene_documents``, and a caption followed by ``VQA_PROMPT`` filled with a
    question and then its answer, about the same image, so that zero-shot VQA can read the answer off
    the context in the same way."""
    import random
    from collections import Counter, defaultdict

    world_root = Path(world_root)
    captions = json.loads((world_root / "captions_train.json").read_text())
    questions = json.loads((world_root / "vqa_train.json").read_text())
    by_image = defaultdict(list)
    for record in captions:
        by_image[record["image_id"]].append(record["caption"])
    rng = random.Random(seed)
    docs = caption_documents(captions, rng) + scene_documents(world_root, rng)
    for q in questions:
        answer = Counter(q["answer"]).most_common(1)[0][0]
        docs.append(f"{rng.choice(by_image[q['image_id']])}\n{VQA_PROMPT.format(q['question'])} {answer}")
    return docs


def video_corpus(video_root: Path, seed: int = 0) -> list[str]:
    """``caption_documents`` and ``scene_documents`` of the *train* split of a shapes video world (its
    verbs: moves, appears, turns, then ...), so that the frozen LM of the video rows can say what
    happens in a clip."""
    import random

    rng = random.Random(seed)
    captions = json.loads((Path(video_root) / "captions_train.json").read_text())
    return caption_documents(captions, rng) + scene_documents(video_root, rng)


def build_shapes_lm(out_dir: Path) -> dict:
    """Builder of the ``evlgen-mini/shapes-lm`` asset: pretrain on the train text of the default
    shapes world and of the default shapes video world (one LM serves the image and the video rows)."""
    from lavis_evlgen.datasets.shapes_video import ensure_shapes_video
    from lavis_evlgen.datasets.shapes_world import ensure_shapes_world

    world, video_world = ensure_shapes_world(), ensure_shapes_video()
    pretrain_text_lm(shapes_corpus(world) + video_corpus(video_world), out_dir, steps=LM_STEPS, added_tokens=OBJECT_TOKENS)
    return {"corpus": [str(world), str(video_world)], **json.loads((Path(out_dir) / "pretrain_log.json").read_text())}
