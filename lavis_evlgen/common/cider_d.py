"""CIDEr-D in process, with document frequencies computed once from a reference corpus (for SCST rewards).

pycocoevalcap's ``Cider``/``CiderScorer`` (what ``caption_metrics.score_captions`` reports) computes
the document frequencies from the references passed to each call, so a training step that scores
one batch would weight n-grams by that batch alone. ``CiderD`` takes the corpus once (the training
references: one document per image, all of its captions together) and then scores any candidates.

The formula is pycocoevalcap's, which is already CIDEr-D (Vedantam et al. 2015, sec. 4, as in
vrama91/cider's ``CiderD``): n = 1..4, TF-IDF n-gram vectors with idf = log(#images) -
log(max(1, df)), per-n cosine similarity with the candidate's counts clipped at the reference's,
a Gaussian length penalty exp(-(len_c - len_r)^2 / (2 * sigma^2)) with sigma = 6, the mean over n
and over the references, times 10. No stemming (CIDEr-D drops CIDEr's). Differences from
``CiderScorer``:

- document frequencies and ``log(#images)`` come from the corpus given to the constructor, not
  from the references of the call; with the call's references as the corpus the scores are equal
  (tests/test_scst.py checks this against ``CiderScorer``);
- the length in the penalty is the number of words; pycocoevalcap counts bigrams (its
  ``if n == 1: length += term_freq``), i.e. words - 1. The two differences are equal unless one
  side is empty, and then every cosine is 0 anyway, so scores do not change;
- several candidates may be scored against the same references (``CiderScorer`` takes one
  hypothesis per image);
- text is tokenised here by ``tokenize`` (below), not by the Java PTB tokenizer.

Tokenisation: evaluation (``caption_metrics``) runs Stanford's PTBTokenizer via Java, lower-cased,
with its punctuation tokens dropped. Starting a JVM per training step is too slow, so ``tokenize``
approximates it in Python: lower case; clitics split off as PTB does ("man's" -> "man 's",
"don't" -> "do n't"); every other character that is not a letter or digit separates tokens,
except hyphens, slashes and apostrophes inside a word ("black-and-white", "red/blue", "o'brien")
and ".", ",", ":" between digits ("2.5", "1,000", "5:30"), which PTB also keeps in one token.
Known differences, none of which occur in the shapes world's captions: PTB keeps symbols such as
"&", "%", "$", "#" as tokens (dropped here), and "@home" whole (here "home"), keeps "-lrb-"/"-rrb-" for
brackets (its punctuation list holds the upper-case forms but it lower-cases first), keeps
abbreviations whole ("e.g.", "u.s."; here "e g", "u s"), and splits "cannot", "gonna" ("can not",
"gon na"; kept whole here).
"""
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np

_CLITIC = re.compile(r"(?<=[^\W_])'(s|re|ve|ll|d|m)\b")
_NOT = re.compile(r"(?<=[^\W_])n't\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[^\W_]+(?:[-'/][^\W_]+|(?<=\d)[.,:]\d+)*")


def tokenize(text: str) -> list[str]:
    """Caption -> tokens, a PTB-like in-process tokenisation (see the module docstring)."""
    text = text.lower().replace("\u2019", "'")
    text = _NOT.sub(" n't", _CLITIC.sub(r" '\1", text))
    return _TOKEN.findall(text)


def ngram_counts(tokens: Sequence[str], n: int = 4) -> Counter:
    """Counts of every 1..n-gram (tuples of tokens)."""
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


class CiderD:
    """CIDEr-D with document frequencies fixed by a reference corpus.

    Args:
        refs_corpus: the references of every image of the corpus (e.g. the training split), as
            ``{image_id: [captions]}`` or an iterable of caption lists; one document per image.
        n: largest n-gram (4).
        sigma: standard deviation of the Gaussian length penalty (6).
        tokenize: caption -> tokens (``tokenize`` above); captions are tokenised once.
    """

    def __init__(self, refs_corpus, n: int = 4, sigma: float = 6.0, tokenize=tokenize, cache_size: int = 65536):
        self.n, self.sigma, self.tokenize = n, sigma, tokenize
        documents = refs_corpus.values() if isinstance(refs_corpus, Mapping) else refs_corpus
        self.document_frequency = Counter()
        self.num_documents = 0
        for refs in documents:
            if isinstance(refs, str):
                raise TypeError(f"refs_corpus must hold lists of captions per image, got the string {refs!r}")
            ngrams = set()
            for ref in refs:
                ngrams.update(ngram_counts(self.tokenize(ref), n))
            self.document_frequency.update(ngrams)
            self.num_documents += 1
        if self.num_documents == 0:
            raise ValueError("CiderD needs a non-empty reference corpus")
        self.ref_len = math.log(float(self.num_documents))
        # The references of one image recur every epoch (and k times per group): cache their vectors.
        self._ref_vectors = lru_cache(maxsize=cache_size)(self._vectors_of_refs)

    # ------------------------------------------------------------------ vectors
    def _vector(self, tokens: Sequence[str]):
        """TF-IDF vectors per n-gram order, their norms, and the length (words)."""
        vec = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        for ngram, tf in ngram_counts(tokens, self.n).items():
            df = math.log(max(1.0, self.document_frequency.get(ngram, 0.0)))
            weight = tf * (self.ref_len - df)
            vec[len(ngram) - 1][ngram] = weight
            norm[len(ngram) - 1] += weight * weight
        return vec, [math.sqrt(x) for x in norm], len(tokens)

    def _vectors_of_refs(self, refs: tuple[str, ...]):
        return tuple(self._vector(self.tokenize(r)) for r in refs)

    def _sim(self, hyp, ref) -> float:
        """Mean over n of the clipped cosine similarity times the length penalty."""
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        penalty = math.exp(-((len_h - len_r) ** 2) / (2 * self.sigma**2))
        total = 0.0
        for k in range(self.n):
            dot = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
            if norm_h[k] != 0 and norm_r[k] != 0:
                dot /= norm_h[k] * norm_r[k]
            total += dot * penalty
        return total / self.n

    # ------------------------------------------------------------------ scores
    def score(self, candidates: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D (x10 scale) of each candidate against its references.

        Args:
            candidates: C captions.
            refs: C lists of reference captions (at least one each); ``refs[i]`` scores
                ``candidates[i]``, so a group of captions of one image repeats its list.
        Returns:
            float64 array [C].
        """
        if isinstance(candidates, str):
            raise TypeError("candidates must be a list of captions, not one string")
        if len(candidates) != len(refs):
            raise ValueError(f"{len(candidates)} candidates but {len(refs)} reference lists")
        scores = np.zeros(len(candidates))
        for i, (cand, cand_refs) in enumerate(zip(candidates, refs)):
            if isinstance(cand_refs, str) or len(cand_refs) == 0:
                raise ValueError(f"candidate {i} ({cand!r}) needs a non-empty list of references, got {cand_refs!r}")
            hyp = self._vector(self.tokenize(cand))
            ref_vectors = self._ref_vectors(tuple(cand_refs))
            scores[i] = 10.0 * sum(self._sim(hyp, r) for r in ref_vectors) / len(ref_vectors)
        return scores

    def corpus_score(self, candidates: Mapping, refs: Mapping) -> float:
        """Mean CIDEr-D of ``{id: caption}`` against ``{id: [references]}`` (same ids)."""
        if set(candidates) != set(refs):
            raise ValueError("candidates and refs must have the same ids")
        ids = list(candidates)
        return float(self.score([candidates[i] for i in ids], [refs[i] for i in ids]).mean())

