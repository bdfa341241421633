"""The phantom's report writer: MIMIC-style free text with its awkward sections, and the labels it implies."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np

from cxrdiff.data import LABELS
from cxrdiff.phantom.anatomy import SEVERITY_WORDS, Finding

NO_FINDING_IMPRESSIONS = (
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary process.",
    "No acute intrathoracic process.",
    "No acute cardiopulmonary abnormality.",
    "No evidence of acute cardiopulmonary disease.",
    "Normal chest radiograph.",
)
SHORT_IMPRESSIONS = ("Normal.", "Clear.", "No PTX.", "___.", "Stable.")
_NEGATIONS: dict[str, tuple[str, ...]] = {
    "Pleural Effusion": ("No pleural effusion.", "No pleural effusions."),
    "Pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
    "Consolidation": ("No focal consolidation.",),
    "Edema": ("No pulmonary edema.", "No evidence of pulmonary edema."),
    "Cardiomegaly": ("Heart size is normal.", "No cardiomegaly."),
}
_HEDGES = ("Possible {}.", "{} cannot be excluded.", "Findings may represent {}.")
_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}


def label_text(finding: Finding, variant: int = 0) -> str:
    """A short MS-CXR-style phrase for a finding ('small left pleural effusion', 'cardiomegaly')."""
    sev = SEVERITY_WORDS[finding.category][finding.severity - 1]
    side, lobe = finding.side, finding.lobe
    where = f"{side} {lobe} lobe" if side != "bilateral" else f"bilateral {lobe} lobe"
    options = {
        "Cardiomegaly": ("cardiomegaly", f"{sev} cardiomegaly", "enlarged cardiac silhouette"),
        "Pleural Effusion": (
            (f"{sev} bilateral pleural effusions", "bilateral pleural effusions")
            if side == "bilateral"
            else (f"{sev} {side} pleural effusion", f"{side} pleural effusion")
        ),
        "Pneumothorax": (f"{sev} {side} apical pneumothorax", f"{side} pneumothorax", f"{sev} {side} pneumothorax"),
        "Consolidation": (f"{where} consolidation", f"consolidation in the {where}"),
        "Pneumonia": (f"{where} pneumonia", f"pneumonia in the {where}"),
        "Lung Opacity": (
            ("bibasilar opacities", "bilateral lower lobe opacities")
            if side == "bilateral"
            else (f"{where} opacity", f"{sev} {where} opacity")
            + ((f"{side} basilar opacity",) if lobe == "lower" else ())
        ),
        "Edema": (f"{sev} pulmonary edema", "pulmonary edema", f"{sev} interstitial edema"),
        "Atelectasis": (
            ("bibasilar atelectasis", f"{sev} bibasilar atelectasis")
            if side == "bilateral"
            else (f"{side} basilar atelectasis", f"{sev} {side} basilar atelectasis", f"{side} lower lobe atelectasis")
        ),
    }[finding.category]
    return options[variant % len(options)]


def _sentence(phrase: str) -> str:
    return phrase[0].upper() + phrase[1:] + "."


def _finding_sentence(finding: Finding, rng: np.random.Generator, phrase: str) -> str:
    """The impression's sentence for a finding: the phrase, hedged when the finding is uncertain."""
    if not finding.certain:
        return _HEDGES[rng.integers(len(_HEDGES))].format(phrase).capitalize()
    if finding.category == "Cardiomegaly" and rng.random() < 0.3:
        sev = SEVERITY_WORDS["Cardiomegaly"][finding.severity - 1]
        return f"The heart is {_ADVERB[sev]} enlarged, consistent with cardiomegaly."
    if finding.category == "Pleural Effusion" and finding.side != "bilateral" and rng.random() < 0.3:
        return f"There is a {phrase}."
    return _sentence(phrase)


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, width=77, initial_indent=" ", subsequent_indent=" ") or [" "]


def _labels_for(findings: Sequence[Finding], negated: Sequence[str]) -> dict[str, float]:
    """CheXpert labels as the labeler reads the text: 1 stated, -1 hedged, 0 negated, else blank."""
    labels = {name: float("nan") for name in LABELS}
    for name in negated:
        labels[name] = 0.0
    for f in findings:
        labels[f.category] = 1.0 if f.certain else -1.0
    pathology = [n for n in LABELS if n not in ("No Finding", "Support Devices")]
    if not any(labels[n] in (1.0, -1.0) for n in pathology):
        labels["No Finding"] = 1.0
    return labels


def write_report_text(
    rng: np.random.Generator,
    findings: Sequence[Finding],
    phrases: Sequence[str],
    view: str,
    case: str,
    extra_blank: bool,
) -> tuple[str, dict[str, float]]:
    """A MIMIC-style report and the CheXpert labels of the section a labeler reads (impression, else findings).

    `case` is one of standard | no_impression | short_impression | conclusion_heading.
    """
    present = {f.category for f in findings}
    sentences = [_finding_sentence(f, rng, p) for f, p in zip(findings, phrases, strict=True)]
    absent = [c for c in _NEGATIONS if c not in present]
    negated = [c for c in absent if rng.random() < 0.25]
    if findings:
        impression_parts = sentences + [_NEGATIONS[c][rng.integers(len(_NEGATIONS[c]))] for c in negated]
        if len(sentences) > 1 and rng.random() < 0.4:
            impression = "\n".join(f"{i}. {s}" for i, s in enumerate(impression_parts, 1))
        else:
            impression = "  ".join(impression_parts)
    else:
        impression = NO_FINDING_IMPRESSIONS[rng.integers(len(NO_FINDING_IMPRESSIONS))]
        if negated and rng.random() < 0.5:
            impression += "  " + "  ".join(_NEGATIONS[c][0] for c in negated)
        else:
            negated = []
    if case == "short_impression":
        impression, negated = SHORT_IMPRESSIONS[rng.integers(len(SHORT_IMPRESSIONS))], []

    # FINDINGS: the same findings in other words, plus the normal statements.
    body = []
    heart = "Cardiomegaly" in present
    body.append(
        next(s for f, s in zip(findings, sentences, strict=True) if f.category == "Cardiomegaly")
        if heart
        else ("Heart size is normal." if rng.random() < 0.5 else "The cardiomediastinal silhouette is normal.")
    )
    body += [s for f, s in zip(findings, sentences, strict=True) if f.category != "Cardiomegaly"]
    pleura = [c for c in ("Pleural Effusion", "Pneumothorax") if c not in present]
    if pleura:
        body.append("There is no " + " or ".join(c.lower() for c in pleura) + ".")
    if not findings:
        body.insert(1, "The lungs are clear without focal consolidation.")
    if rng.random() < 0.4:
        body.append("No acute osseous abnormalities are seen.")
    findings_labels = _labels_for(
        findings, [*pleura, *(["Cardiomegaly"] if not heart else []), *(["Consolidation"] if not findings else [])]
    )
    impression_labels = _labels_for(findings if case != "short_impression" else [], negated)

    exam = "CHEST (PA AND LAT)" if view == "PA" else "CHEST (PORTABLE AP)"
    indication = ("cough", "shortness of breath", "fever", "chest pain", "hypoxia", "evaluate for pneumonia")
    sex = ("man", "woman")[int(rng.integers(2))]
    lines = [
        "                                 FINAL REPORT",
        f" EXAMINATION:  {exam}",
        " ",
        f" INDICATION:  ___-year-old {sex} with {indication[rng.integers(len(indication))]}.",
        " ",
        f" TECHNIQUE:  Chest {'PA and lateral' if view == 'PA' else 'portable AP'}",
        " ",
        f" COMPARISON:  {('None.', '___.', 'Chest radiograph from ___.')[rng.integers(3)]}",
        " ",
        " FINDINGS: ",
        " ",
        *_wrap("  ".join(body)),
    ]
    if case != "no_impression":
        heading = "CONCLUSION:" if case == "conclusion_heading" else "IMPRESSION:"
        lines += [" ", f" {heading} ", " "]
        for paragraph in impression.split("\n"):
            lines += _wrap(paragraph)
        if "Pneumothorax" in present and rng.random() < 0.5:
            lines += _wrap("Findings were discussed with Dr. ___ by ___ at ___ on ___.")
    if extra_blank:
        spaced = []
        for line in lines:
            spaced.append(line)
            if line.strip().endswith(":"):
                spaced += [" ", ""]
        lines = spaced + ["", ""]
    labels = findings_labels if case == "no_impression" else impression_labels
    return "\n".join(lines) + "\n", labels
