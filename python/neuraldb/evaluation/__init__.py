"""Evaluation with ROME/MEMIT's metric definitions, stated in one place per module.

* :mod:`.counterfact` — efficacy / generalization / specificity (success rates and magnitudes), fluency, consistency
* :mod:`.zsre` — teacher-forced token-level top-1 accuracy (efficacy / generalization / specificity), KnowEdit's
  same-subject locality and portability
* :mod:`.fluency` — ROME's n-gram entropy and TF-IDF consistency
* :mod:`.general` — LAMBADA, WikiText-2, ARC-E/C, WSC273, CommonsenseQA, PIQA, MMLU from local files
* :mod:`.deletion` — the paper's App. J.5 delete-even-facts experiment
* :mod:`.distractors` — edited facts among many more (distractor) keys: metrics and retrieval hits vs table size
* :mod:`.gate` — exact post-edit scores that re-score only the sequences the gate opens on
* :mod:`.report` — JSON, Markdown tables and plots
* :mod:`.scoring` — the shared batched teacher-forcing helper
"""

from .counterfact import evaluate_counterfact
from .fluency import fluency_score, ngram_entropy
from .general import evaluate_general
from .scoring import ContinuationScore, score_continuations
from .zsre import evaluate_zsre, locality_unchanged, same_subject_locality

__all__ = [
    "ContinuationScore",
    "evaluate_counterfact",
    "evaluate_general",
    "evaluate_zsre",
    "fluency_score",
    "locality_unchanged",
    "ngram_entropy",
    "same_subject_locality",
    "score_continuations",
]
