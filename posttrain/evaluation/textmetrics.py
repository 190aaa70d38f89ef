"""Reference-based scores of free-text answers: ROUGE-L, BLEU and token F1.

ROUGE-L comes from `rouge-score` (Google's reimplementation of ROUGE-1.5.5; F-measure, no stemming, its own
tokenizer: lower case, runs of letters and digits), BLEU from `sacrebleu` (corpus BLEU, 0-100, its default 13a
tokenization and exponential smoothing), token F1 as SQuAD v1.1's evaluation script defines it (lower case, no
punctuation, no articles, bag-of-token overlap). evaluate adds them for the instruction suite next to exact match:
they give partial credit ("blue fox red" for "red fox blue" scores, exact match does not).
"""

from __future__ import annotations

import re
import string
from collections import Counter

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = set(string.punctuation)


def squad_normalise(text: str) -> str:
    """SQuAD v1.1's normalize_answer: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1 of one answer: harmonic mean of token precision and recall over the normalised bags of tokens.
    Both empty after normalising: 1.0, one empty: 0.0 (SQuAD v2.0's rule; v1.1's script divides by zero there)."""
    pred, ref = squad_normalise(prediction).split(), squad_normalise(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: list[str], references: list[str]) -> float | None:
    """Mean ROUGE-L F-measure over the pairs; None without pairs."""
    if not predictions:
        return None
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)


def bleu(predictions: list[str], references: list[str]) -> float | None:
    """sacrebleu's corpus BLEU (0-100) of the predictions against one reference each; None without pairs."""
    if not predictions:
        return None
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def text_scores(predictions: list[str], references: list[str], prefix: str = "") -> dict[str, float | None]:
    """`{prefix}rougeL`, `{prefix}bleu` and `{prefix}f1` (mean token F1) of the predictions; None for no pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    f1 = sum(map(token_f1, predictions, references)) / len(predictions) if predictions else None
    return {f"{prefix}rougeL": rouge_l(predictions, references), f"{prefix}bleu": bleu(predictions, references),
            f"{prefix}f1": f1}
