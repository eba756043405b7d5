"""score_captions: the COCO metrics on a handful of captions. METEOR (Java, ~10 s to start)
runs once, in a module-scoped fixture; the other tests replace it with a stub."""
import logging

import pytest

from lavis_evlgen.common import caption_metrics
from lavis_evlgen.common.caption_metrics import score_captions

REFERENCES = {
    1: ["a dog runs across the green grass", "a brown dog running on a lawn"],
    2: ["a red bus parked on a city street", "a double decker bus on the road"],
    3: ["two people riding horses on a beach", "riders on horseback along the shore"],
    4: ["a plate of pasta with tomato sauce", "spaghetti and sauce on a white plate"],
    5: ["a man surfing a large wave", "a surfer riding a big ocean wave"],
}
IDENTICAL = {i: [refs[0]] for i, refs in REFERENCES.items()}
UNRELATED = {i: ["an old clock tower under snow"] for i in REFERENCES}
METRICS = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}


class StubMeteor:
    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(res)


@pytest.fixture(scope="module")
def identical_scores():
    return score_captions(REFERENCES, IDENTICAL)


@pytest.fixture
def no_java_meteor_no_spice(monkeypatch, tmp_path):
    monkeypatch.setattr(caption_metrics, "Meteor", StubMeteor)
    monkeypatch.setattr(caption_metrics, "SPICE_CORENLP_JAR", tmp_path / "absent.jar")


def test_identical_captions_score_high(identical_scores):
    assert METRICS <= set(identical_scores)
    assert all(isinstance(v, float) for v in identical_scores.values())
    assert identical_scores["Bleu_4"] > 0.9
    assert identical_scores["CIDEr"] > 2.0
    assert identical_scores["METEOR"] > 0.5
    assert identical_scores["ROUGE_L"] > 0.9


def test_unrelated_captions_score_low(identical_scores, no_java_meteor_no_spice, caplog):
    with caplog.at_level(logging.INFO):
        scores = score_captions(REFERENCES, UNRELATED)
    assert scores["Bleu_4"] < 0.05 and scores["CIDEr"] < 0.1 and scores["ROUGE_L"] < 0.2
    assert scores["CIDEr"] < identical_scores["CIDEr"] / 10
    assert "SPICE" not in scores
    assert any(r.getMessage().startswith("SPICE skipped") for r in caplog.records)


def test_mismatched_ids_are_an_error(no_java_meteor_no_spice):
    with pytest.raises(ValueError, match="1 only in gts"):
        score_captions(REFERENCES, {i: c for i, c in IDENTICAL.items() if i != 5})


def test_one_caption_per_id(no_java_meteor_no_spice):
    with pytest.raises(ValueError, match=r"res\[1\] must be a list of one caption"):
        score_captions(REFERENCES, {**IDENTICAL, 1: ["a dog", "a cat"]})
