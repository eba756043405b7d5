"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE when it can run offline).

pycocoevalcap's scorers are called directly: ``COCOEvalCap.evaluate`` always builds SPICE,
which downloads Stanford CoreNLP on first use. METEOR and the PTB tokenizer run Java; METEOR
takes ~10 s to start.
"""
import logging
from pathlib import Path

import pycocoevalcap.spice
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.get_stanford_models import JAR, SPICELIB
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

SPICE_CORENLP_JAR = Path(pycocoevalcap.spice.__file__).parent / SPICELIB / f"{JAR}.jar"


def _check(gts: dict, res: dict) -> None:
    if set(gts) != set(res):
        only_gts, only_res = sorted(set(gts) - set(res), key=str), sorted(set(res) - set(gts), key=str)
        raise ValueError(
            f"gts and res must have the same ids: {len(only_gts)} only in gts (first {only_gts[:5]}), "
            f"{len(only_res)} only in res (first {only_res[:5]})"
        )
    for i, captions in res.items():
        if not isinstance(captions, list) or len(captions) != 1:
            raise ValueError(f"res[{i!r}] must be a list of one caption, got {captions!r}")
    for i, captions in gts.items():
        if not isinstance(captions, list) or not captions:
            raise ValueError(f"gts[{i!r}] must be a non-empty list of captions, got {captions!r}")


def score_captions(gts: dict, res: dict) -> dict[str, float]:
    """Corpus-level caption scores.

    Args:
        gts: id -> reference captions (list[str], at least one).
        res: id -> [generated caption] (a list of exactly one str); same ids as ``gts``.
    Returns:
        {"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} and "SPICE" when its Stanford CoreNLP
        models are installed, as floats (fractions, CIDEr unbounded).
    """
    _check(gts, res)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in gts.items()})
    res = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in res.items()})

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if SPICE_CORENLP_JAR.is_file():
        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    else:
        logging.info("SPICE skipped: %s not found (pycocoevalcap's get_stanford_models downloads it).", SPICE_CORENLP_JAR)
    return scores
