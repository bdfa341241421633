"""The text each training row is conditioned on (`TrainingText`): impressions, class names or a file of
alternatives per class, MIMIC's de-identification markers kept or stripped, and the unconditional-guidance
rule. Shared by `finetune`, which trains on it, and the report's memorization score, which asks a model
for the texts it was trained on."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.data import LABELS, read_keyed_csv
from cxrdiff.errors import InputError

NO_FINDING = "No Finding"
DEID_MARKER = re.compile(r"[ \t]*(?:_{3,}[ \t]*)+")  # MIMIC's de-identification placeholders "___", their spaces
BEFORE_PUNCTUATION = re.compile(r"[ \t]*(?:_{3,}[ \t]*)+(?=[,.;:!?)]|$)")


def strip_deid_markers(text: str) -> str:
    """The text without MIMIC's "___" markers: a marker before punctuation or at the end goes with its spaces
    ("Compared to ___." → "Compared to."), one between words leaves one space ("Dr. ___ was" → "Dr. was"); a text
    left without a letter or digit ("___." → ".") is the empty prompt."""
    stripped = DEID_MARKER.sub(" ", BEFORE_PUNCTUATION.sub("", text)).strip()
    return stripped if any(c.isalnum() for c in stripped) else ""


class TrainingText:
    """The training text of each row (impression, class names, or a random alternative per class),
    with the unconditional-guidance rule: samples whose only positive label is No Finding get "".
    COCO rows (`any_row`) hold every caption of their image: one is drawn per step, and any row may get "".
    `deid_markers="strip"` removes MIMIC's "___" markers from every text (`strip_deid_markers`)."""

    def __init__(
        self,
        source: str,
        impressions: Sequence[Any],
        labels: np.ndarray,
        ucg: float,
        any_row=False,
        deid_markers: str = "keep",
    ):
        if deid_markers not in ("keep", "strip"):
            raise InputError(f"--deid-markers {deid_markers!r}: expected keep or strip")
        self.source, self.impressions, self.ucg = source, impressions, ucg
        self.strip = deid_markers == "strip"
        self.positive = labels == 1.0  # (rows, 14); NaN, 0 and -1 (uncertain) are not positive
        nf = LABELS.index(NO_FINDING)
        self.no_finding_only = self.positive[:, nf] & (self.positive.sum(axis=1) == 1)  # (rows,)
        self.eligible = np.ones(len(labels), dtype=bool) if any_row else self.no_finding_only  # (rows,)
        self.alternatives = check_prompt_source(source)

    def text(self, row: int, rng: np.random.Generator) -> str:
        text = self.drawn(row, rng)
        return strip_deid_markers(text) if self.strip else text

    def drawn(self, row: int, rng: np.random.Generator) -> str:
        """The row's text as the source gives it (markers kept)."""
        if self.source == "impression":
            value = self.impressions[row]
            if isinstance(value, list | tuple):  # COCO: every caption of the image, one drawn per step
                return str(value[rng.integers(len(value))])
            return str(value)
        classes = np.flatnonzero(self.positive[row])
        if self.source == "labels":  # the reference code: the class names in random order, space-joined
            return " ".join(LABELS[c] for c in rng.permutation(classes))
        picks = [c for c in classes if c in self.alternatives]
        if not len(classes) and LABELS.index(NO_FINDING) in self.alternatives:
            picks = [LABELS.index(NO_FINDING)]  # no positive label at all reads as a normal study
        return " ".join(self.alternatives[c][rng.integers(len(self.alternatives[c]))] for c in picks)

    def batch(self, rows: np.ndarray, rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Prompts for `rows`, whether each was eligible for the empty prompt, and whether it got it."""
        eligible = self.eligible[rows]  # (batch,)
        dropped = eligible & (rng.random(len(rows)) < self.ucg)  # (batch,)
        texts = ["" if d else self.text(int(r), rng) for r, d in zip(rows, dropped, strict=True)]
        return texts, eligible, dropped


def check_prompt_source(source: str) -> dict[int, list[str]]:
    """Validate `--prompt-source`; for `file:PATH` read its CSV (columns label, a CheXpert name, and text)."""
    if not source.startswith("file:"):
        if source not in ("impression", "labels"):
            raise InputError(f"--prompt-source {source!r}: expected impression, labels or file:PATH")
        return {}
    rows = read_keyed_csv(Path(source[5:]), "--prompt-source file:", "label", "text", LABELS)
    out: dict[int, list[str]] = {}
    for label, text in rows:
        out.setdefault(LABELS.index(label), []).append(text)
    return out
