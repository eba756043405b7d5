"""VQA answers lemmatised as in the authors' OK-VQA evaluation (method.md section 6): nouns and verbs
replaced by their lemma with spaCy's small English model, other words kept.

spaCy is an optional dependency: only ``apply_lemmatizer: True`` needs it, and its absence (or the
model's) is an error that names the install command.
"""
from functools import lru_cache

SPACY_MODEL = "en_core_web_sm"


@lru_cache(maxsize=1)
def _nlp():
    try:
        import spacy
    except ImportError as error:
        raise ImportError(f"apply_lemmatizer needs spaCy and its {SPACY_MODEL} model: pip install spacy && "
                          f"python -m spacy download {SPACY_MODEL}") from error
    try:
        return spacy.load(SPACY_MODEL)
    except OSError as error:
        raise OSError(f"apply_lemmatizer needs spaCy's {SPACY_MODEL} model, which is not installed: "
                      f"python -m spacy download {SPACY_MODEL}") from error


def lemmatize_with(nlp, answers: list[str]) -> list[str]:
    """Each answer with its NOUN and VERB tokens replaced by their lemmas, words joined by spaces."""
    return [" ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in nlp(a)) for a in answers]


def lemmatize(answers: list[str]) -> list[str]:
    """``lemmatize_with`` spaCy's en_core_web_sm (loaded once per process)."""
    return lemmatize_with(_nlp(), answers)
