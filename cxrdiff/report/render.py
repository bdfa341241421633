"""The report's rendering: a pure function from the metrics dict to metrics.json, report.md and a
self-contained report.html (figures inlined as base64 PNG), with the paper's tables beside the runs.

Pure so that it can be tested (and re-run on a saved metrics.json) without any model or step folder.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import write_bytes, write_json, write_text
from cxrdiff.figures import bounded_dpi
from cxrdiff.metrics.intervals import MIN_POSITIVES, classifier_auc_cell
from cxrdiff.metrics.score import UNTRAINED_LABEL, Score
from cxrdiff.report import page
from cxrdiff.report.benchmark import benchmark_tables
from cxrdiff.report.classes import class_note, grounding_set_name, shown_classes
from cxrdiff.report.document import Page, Table, html, markdown
from cxrdiff.report.laterality import laterality_table
from cxrdiff.report.page import interval_text
from cxrdiff.report.privacy import privacy_figures, privacy_tables
from cxrdiff.report.published import (
    CLASSIFIER_ORDER,
    COMPUTED_CELLS,
    PAPER,
    PROTOCOL,
    PUBLISHED_CLASSIFIER,
    PUBLISHED_CNR_METHODS,
    PUBLISHED_EOS_CNR,
    PUBLISHED_FIDELITY,
    PUBLISHED_FIDELITY_MS_CXR,
    PUBLISHED_LOCALIZATION,
    PUBLISHED_LOCALIZATION_STD,
    PUBLISHED_TEXT_SOURCE,
    PUBLISHED_WORDS,
    SDV2_CNR_NOTE,
    TABLE3_AVERAGE_NOTE,
    WORDS_MIN_COUNT,
)
from cxrdiff.report.records import (
    GroupScore,
    Localization,
    Measure,
    ReportRecords,
    RunResult,
    TrainingGroup,
    read_metrics,
)
from cxrdiff.report.text_source import source_name


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def _pub(value: float) -> str:
    """A published number as printed in the paper (no added or dropped digits)."""
    return f"{value:g}"


def _mean(entry: Measure | None, scale: float = 1.0, digits: int = 1) -> str:
    if not entry:
        return "—"
    text = _fmt(None if entry.mean is None else entry.mean * scale, digits)
    return text + (f" ± {entry.std * scale:.{digits}f}" if entry.std else "")


def _score_cell(entry: Score | None, digits: int = 1) -> str:
    return entry.text(digits) if entry else "—"


def tables(metrics: Mapping[str, Any] | ReportRecords) -> list[Table]:
    """The paper's tables (published numbers labelled with their source) beside this report's runs."""
    records = read_metrics(metrics)
    runs, metrics = records.runs, records.metrics
    listed = [
        _localization_table(runs, metrics),
        laterality_table(runs),
        _trainings_table(records),
        _cnr_table(runs, metrics),
        _fidelity_table(runs),
        _fidelity_sources_table(records),
        _classifier_table(records),
        *benchmark_tables(records),
        *privacy_tables(metrics),
        _word_table(runs, shown_classes(metrics)),
        _eos_table(records),
        _text_source_table(),
        _text_source_measured_table(records),
        _encoder_table(records),
    ]
    return [t for t in listed if t is not None]


def _localization_table(runs: Mapping[str, RunResult], metrics: Mapping[str, Any]) -> Table:
    headers = (
        ["class"] + [f"{m} (published, Table 1)" for m in PUBLISHED_LOCALIZATION] + [f"{n} (this report)" for n in runs]
    )
    rows = []
    for c in [*shown_classes(metrics), "Average"]:
        row = [c] + [_published_localization(m, c) for m in PUBLISHED_LOCALIZATION]
        for r in runs.values():
            e = r.grounding.at(c)
            row.append(
                " / ".join(
                    _mean(e.measure(m), scale, digits) + interval_text(r.grounding.interval(c, m), digits, scale)
                    for m, scale, digits in (("auc_roc", 100, 1), ("top1", 100, 1), ("cnr", 1, 2))
                )
                if e
                else "—"
            )
        rows.append(row)
    return Table(
        f"Localization on {grounding_set_name(metrics)}: AUC-ROC % / Top-1 % / CNR",
        headers,
        rows,
        f"Published: {PAPER}, Table 1 (± over three trainings; SDv2 has none). {SDV2_CNR_NOTE} Measured: [ ] a 95% "
        "bootstrap interval over the phrases (class-stratified for the Average); ± (if any) is over grounding "
        "noise seeds, not trainings. Boxes: the union of an image's boxes of the class." + class_note(metrics),
    )


def _published_localization(method: str, category: str) -> str:
    """Table 1's cell as printed: mean ± std of each metric when the paper gives a std; — for a class the
    paper does not have."""
    if category not in PUBLISHED_LOCALIZATION[method]:
        return "—"
    means = PUBLISHED_LOCALIZATION[method][category]
    stds = PUBLISHED_LOCALIZATION_STD.get(method, {}).get(category)
    if stds is None:
        return " / ".join(_pub(v) for v in means)
    return " / ".join(f"{_pub(m)} ± {_pub(s)}" for m, s in zip(means, stds, strict=True))


def _cnr_table(runs: Mapping[str, RunResult], metrics: Mapping[str, Any]) -> Table:
    """Table 3: phrase grounding, so each phrase is scored against its own boxes (`--boxes per-phrase`)."""
    headers = ["class"] + [f"{m} (published, Table 3)" for m in PUBLISHED_CNR_METHODS] + [f"{n} CNR" for n in runs]
    rows = []
    for c in [*shown_classes(metrics), "Average"]:
        row = [c] + [_pub(PUBLISHED_CNR_METHODS[m][c]) + (" (computed)" if (m, c) in COMPUTED_CELLS else "")
                     if c in PUBLISHED_CNR_METHODS[m] else "—" for m in PUBLISHED_CNR_METHODS]  # fmt: skip
        for r in runs.values():
            grounding = r.per_phrase or r.grounding
            e = grounding.at(c)
            row.append(_mean(e.cnr, 1, 2) + interval_text(grounding.interval(c, "cnr")) if e else "—")
        rows.append(row)
    same = all(r.per_phrase is None for r in runs.values())
    boxes = "Measured per phrase (each phrase against its own boxes, `--boxes per-phrase`)" + (
        "; on these data no image and class has two phrases, so it equals Table 1's union scoring." if same else "."
    )
    return Table(
        "CNR against published phrase-grounding methods",
        headers,
        rows,
        f"Published: Table 3 of {PAPER}; BioViL-T reports 1.33 ± 0.04 average. {boxes} {TABLE3_AVERAGE_NOTE} "
        "Measured: [ ] a 95% bootstrap interval over the phrases." + class_note(metrics),
    )


def _fidelity_table(runs: Mapping[str, RunResult]) -> Table:
    titles: dict[str, str] = {}
    for r in runs.values():
        for s in r.fidelity or ():
            titles.setdefault(s.name, s.title)
    names = ["FID", "FID_XRV"] + [n for n in titles if n not in ("FID", "FID_XRV")]
    headers = ["model", "source"] + [titles.get(n, n) for n in names] + ["MS-SSIM %"]
    headers[2] += ": published values not comparable, see note"
    rows = []
    for source, table in (("MIMIC p19 prompts", PUBLISHED_FIDELITY), ("MS-CXR phrases", PUBLISHED_FIDELITY_MS_CXR)):
        for m, (f1, f2, ms) in table.items():
            row = [m, f"published, Table 4 ({source})", _pub(f1), _pub(f2)]
            rows.append(row + ["—"] * (len(names) - 2) + [_pub(ms)])
    for n, r in runs.items():
        if r.fidelity is None:  # grounded only (a Table 7 run)
            continue
        by_name = {s.name: s for s in r.fidelity}
        rows.append([n, "this report"] + [_score_cell(by_name.get(k)) for k in names] + [_score_cell(r.diversity)])
    div = next((r.diversity.protocol for r in runs.values() if r.diversity), None)
    note = (
        f"Published: Table 4 of {PAPER} (512 px, 5,000 images). {FID_NOT_COMPARABLE} This report's images "
        "come from the MIMIC p19 prompts. [ ] a 95% interval: Fréchet distances ± 1.96 bootstrap s.d. over the "
        "generated images (real features fixed); MS-SSIM (± std over prompts, as the paper) a bootstrap over prompts."
    )
    if div:
        note += (
            f" MS-SSIM here: {div.get('scales')} scales, {div.get('kernel_size')}-px window σ {div.get('sigma'):.2f}, "
            f"data range {div.get('data_range'):g}, {div.get('prompts')} prompts × 6 pairs."
        )
    return Table("Fidelity and diversity", headers, rows, note)


def _classifier_cell(entry: Score | None) -> str:
    """An AUC with its interval, or "too few (n)" when fewer than 5 positive images stand behind it."""
    if not entry:
        return "—"
    positives = entry.protocol.get("positives")
    if positives is not None:
        shown = classifier_auc_cell(positives, entry.protocol.get("negatives", 0), entry.value)
        if not shown[:1].isdigit():
            return shown
    return _score_cell(entry)


def _classifier_counts(name: str, aucs: Mapping[str, Score]) -> str:
    """What each cell of a row rests on: positives per class, the No-Finding negatives they share, the
    Average's classes (from each score's protocol in metrics.json)."""
    counts = [f"{c} {aucs[c].protocol['positives']}" for c in CLASSIFIER_ORDER
              if c != "Average" and c in aucs and "positives" in aucs[c].protocol]  # fmt: skip
    negatives = next((a.protocol["negatives"] for a in aucs.values() if "negatives" in a.protocol), 0)
    average = aucs["Average"].protocol.get("classes") if "Average" in aucs else None
    return f"{name}: {', '.join(counts)}; No Finding {negatives}; Average over {average or 0} classes"


def _classifier_table(records: ReportRecords) -> Table:
    headers = ["images", "source", *CLASSIFIER_ORDER]
    rows = [[m, "published, Table 5"] + [_pub(v[c]) for c in CLASSIFIER_ORDER] for m, v in PUBLISHED_CLASSIFIER.items()]
    measured = []
    if records.real_classifier:
        measured.append(("real p19 (reference)", records.real_classifier))
    measured += [(n, r.classifier) for n, r in records.runs.items() if r.classifier]
    rows += [[n, "this report"] + [_classifier_cell(aucs.get(c)) for c in CLASSIFIER_ORDER] for n, aucs in measured]
    rule = records.settings.get("classifier_positives", "only")
    positives = (
        "images whose only label is d, against images whose only label is No Finding (the paper's protocol)"
        if rule == "only"
        else "every image labelled d, against every image labelled No Finding (`--classifier-positives any`)"
    )
    per_class = records.settings.get("classifier_prompts_per_class")
    if per_class:
        positives += (
            f". Generated rows: the check's own prompt set, {per_class} prompts per class and {per_class} No Finding "
            "ones drawn from the p19 test rows counted for the class (repeated when it has fewer, each image its "
            "own seed; `--classifier-prompts-per-class`); the real row: the p19 test images themselves"
        )
    counts = " | ".join(_classifier_counts(n, aucs) for n, aucs in measured)
    return Table(
        "Classifier AUC %: class d vs No Finding",
        headers,
        rows,
        f"Classifier here: {records.classifier or 'none'}; positives: {positives}. [ ] a 95% bootstrap "
        f"interval over the images; an AUC from fewer than {MIN_POSITIVES} positive images is shown as 'too few "
        f"(n)' and left out of the Average. Images each cell rests on (positives per class, negatives): "
        f"{counts or 'none'}. Published: Table 5 of {PAPER}, torchxrayvision."
        + _classifier_classes_note(records.metrics, measured),
    )


def _classifier_classes_note(metrics: Mapping[str, Any], measured: list) -> str:
    """Which of Table 5's classes no measured row has (no test image counts for them), and which classes of
    the grounding set the check does not score (its classes are CheXpert's, from the test set's labels)."""
    note = ""
    unscored = [c for c in CLASSIFIER_ORDER if c != "Average" and measured and not any(a.get(c) for _, a in measured)]
    if unscored:
        note += f" No test image counts for {', '.join(unscored)} (—)."
    outside = [c for c in shown_classes(metrics) if c not in CLASSIFIER_ORDER]
    if outside:
        note += (
            f" Not in this check: {', '.join(outside)} ({grounding_set_name(metrics)}), not among CheXpert's "
            "labels that the check reads."
        )
    return note


def _word_table(runs: Mapping[str, RunResult], classes: list[str]) -> Table:
    """Table 6 beside this report's runs: per class, the paper's top words (published rows), then each run's
    3 words with the highest mean CNR and the class's own words among the ranked; the EOS rows last."""
    rows, thresholds = [], set()
    measured: dict[str, list[list[str]]] = {}
    eos_rows = [
        [f"{m} (published)", "EOS over all classes", f"<EOS> ({_pub(v)})", ""] for m, v in PUBLISHED_EOS_CNR.items()
    ]
    for n, r in runs.items():
        analysis = r.grounding.words
        if analysis.min_count is not None:
            thresholds.add(analysis.min_count)
        for c, words in analysis.top3.items():
            listed = ", ".join(f"{w.word} ({w.n}, {w.cnr:.2f})" for w in analysis.class_words.get(c, ())) or "—"
            top = ", ".join(f"{w.word} ({w.n}, {w.cnr:.2f})" for w in words)
            measured.setdefault(c, []).append([n, c, top, listed])
        if analysis.eos_cnr is not None:
            eos_rows.append([n, "EOS over all classes", f"<EOS> ({analysis.eos_cnr:.2f})", ""])
    for c in dict.fromkeys([*classes, *measured]):
        for m, table in PUBLISHED_WORDS.items():
            if c in table:
                words = ", ".join(f"{w} ({k}, {_pub(cnr)})" for w, k, cnr in table[c])
                rows.append([f"{m} (published, Table 6)", c, words, "—"])
        rows += measured.get(c, [])
    threshold = " / ".join(str(t) for t in sorted(thresholds)) or "—"
    return Table(
        "Word analysis (Table 6 and this report): the words with the highest mean CNR per class",
        ["model", "class", "top words (occurrences in the class, mean CNR)", "the class's own words among the ranked"],
        rows + eos_rows,
        f"Published: Table 6 of {PAPER}, words occurring more than {WORDS_MIN_COUNT} times in the class's phrases "
        "(Finetune_L: EOS tops 7 of 8 classes, only Pneumothorax is listed; SDv2: the best word only); the EOS "
        "token's CNR over all classes from its text. This report counts as the paper did (per class, case kept, "
        f"<SOS> and <EOS> included); threshold used: a word ranks when it occurs in more than {threshold} of the "
        f"class's phrases (the paper: {WORDS_MIN_COUNT}, over MS-CXR's 1,162 phrases; a smaller phrase set scales "
        "it).",
    )


def _text_source_table() -> Table:
    rows = [[src, _pub(a), _pub(b)] for src, (a, b) in PUBLISHED_TEXT_SOURCE.items()]
    headers = ["text", "learnable (published)", "frozen (published)"]
    return Table("CNR by training text (published, Table 7)", headers, rows)


# --- over trainings (metrics["groups"]): Table 1's ±, Table 4's two prompt sources, Table 7, EOS ----------


def _over(entry: Measure | None, scale: float = 1.0, digits: int = 2) -> str:
    """A {mean, std, n} over trainings: 'mean ± std' (the ± only when there are two trainings or more)."""
    if not entry or entry.mean is None:
        return "—"
    text = f"{entry.mean * scale:.{digits}f}"
    return text + (f" ± {entry.std * scale:.{digits}f}" if (entry.n or 0) > 1 else "")


def _trainings_note(records: ReportRecords) -> str:
    ddof = records.ddof
    return (
        f"± = standard deviation over trainings of one setting (ddof = {ddof}; runs grouped by their manifests' "
        "settings, all but the seed), as the paper's Table 1; no ± with one training. Grounding noise seeds "
        "(`ground --noise-seeds`) are a separate source of variance, not included."
    )


def _group_label(name: str, trainings: int) -> str:
    n = trainings
    return f"{name} ({n} training{'s' if n != 1 else ''})"


def _trainings_table(records: ReportRecords) -> Table | None:
    """Table 1 over trainings: each setting group's mean ± std of AUC-ROC %, Top-1 % and CNR."""
    groups = records.groups
    if not any(g.trainings >= 2 for g in groups.values()):
        return None  # one training per setting: the table would repeat Table 1's runs
    published = [m for m in PUBLISHED_LOCALIZATION_STD]
    headers = ["class"] + [f"{m} (published, Table 1)" for m in published]
    headers += [f"{_group_label(g, v.trainings)} (this report)" for g, v in groups.items()]
    rows = []
    for c in [*shown_classes(records.metrics), "Average"]:
        row = [c] + [_published_localization(m, c) for m in published]
        for g in groups.values():
            e = g.grounding.at(c)
            row.append(" / ".join((_over(e.auc_roc, 100, 1), _over(e.top1, 100, 1), _over(e.cnr))) if e else "—")
        rows.append(row)
    noise = "; ".join(f"{g}: {v.noise_cnr:.3f}" for g, v in groups.items() if v.noise_cnr)
    note = _trainings_note(records) + (f" Mean std of the average CNR over noise seeds: {noise}." if noise else "")
    note += class_note(records.metrics)
    return Table("Localization over trainings: AUC-ROC % / Top-1 % / CNR, mean ± std", headers, rows, note)


def _by_source(group: TrainingGroup, ms_cxr: bool) -> tuple[Mapping[str, GroupScore], Measure | None]:
    """A group's fidelity scores and diversity from the p19 prompts, or from the MS-CXR phrases."""
    if ms_cxr:
        return group.fidelity_ms_cxr, group.diversity_ms_cxr
    return group.fidelity, group.diversity


def _fidelity_sources_table(records: ReportRecords) -> Table | None:
    """Table 4 in full: fidelity and diversity from the p19 prompts and from the MS-CXR phrases, per group."""
    groups = records.groups
    if not groups:
        return None
    titles: dict[str, str] = {}
    for g in groups.values():
        for scores in (g.fidelity, g.fidelity_ms_cxr):
            for name, e in scores.items():
                titles.setdefault(name, e.title)
    names = ["FID", "FID_XRV"] + [n for n in titles if n not in ("FID", "FID_XRV")]
    headers = ["model", "prompts", "source"] + [titles.get(n, n) for n in names] + ["MS-SSIM %"]
    rows = []
    sources = (("MIMIC p19", False, PUBLISHED_FIDELITY), ("MS-CXR phrases", True, PUBLISHED_FIDELITY_MS_CXR))
    for prompts, _, table in sources:
        for m, (f1, f2, ms) in table.items():
            rows.append([m, prompts, "published, Table 4", _pub(f1), _pub(f2)] + ["—"] * (len(names) - 2) + [_pub(ms)])
    for g, v in groups.items():
        for prompts, ms_cxr, _ in sources:
            scores, diversity = _by_source(v, ms_cxr)
            if not scores and not (diversity and diversity.n):
                continue  # not sampled (report --table4-p19-only, or a Table 7 run grounded only)
            cells = [_over(scores.get(n), 1, 1) for n in names]
            rows.append([_group_label(g, v.trainings), prompts, "this report", *cells, _over(diversity, 1, 1)])
    counts = "; ".join(
        f"{_group_label(g, v.trainings)}: {v.n_generated or '?'} p19, {v.n_generated_ms_cxr or '?'} MS-CXR"
        for g, v in groups.items()
        if v.n_generated
    )
    note = (
        "Both prompt sources sampled and scored the same way (sampler, seeds), each against as many real p19 "
        "images as it has generated ones (a Fréchet distance depends on the counts; the paper compared 1,162 "
        f"MS-CXR images with its 5,000 real ones). Generated images: {counts or 'see metrics.json'}. "
        f"{FID_NOT_COMPARABLE} " + _trainings_note(records)
    )
    return Table("Fidelity and diversity by prompt source (Table 4, both columns)", headers, rows, note)


def _text_source_measured_table(records: ReportRecords) -> Table | None:
    """Table 7 measured: CNR on the phrases that contain their label, per training text and text encoder."""
    groups = {g: v for g, v in records.groups.items() if v.setting.text_encoder}
    if not groups:
        return None
    cells: dict[str, dict[str, list[str]]] = {}
    for g, v in groups.items():
        source, encoder = source_name(v.text_source), v.setting.text_encoder
        text = f"{_over(v.text_cnr)} ({_group_label(g, v.trainings)}, {v.text_phrases or 0} phrases)"
        cells.setdefault(source, {}).setdefault(encoder, []).append(text)
    rows = [[s, "; ".join(c.get("learnable", ["—"])), "; ".join(c.get("frozen", ["—"]))] for s, c in cells.items()]
    rows += [[f"{s} (published)", _pub(a), _pub(b)] for s, (a, b) in PUBLISHED_TEXT_SOURCE.items()]
    note = (
        "Measured CNR on the MS-CXR phrases that contain their image's label (the class name, case-insensitive), "
        f"as the paper's Table 7 ({PAPER}). Labels runs train on the class names in random order, space-joined. "
        + _other_sources_note(records)
        + _trainings_note(records)
    )
    return Table("CNR by training text (Table 7, measured)", ["text", "learnable", "frozen"], rows, note)


@dataclass(frozen=True)
class EncoderRow:
    """One setting group by text encoder × frozen/learnable: what was trained and its CNR, AUC-ROC and first
    fidelity score over trainings."""

    encoder: str
    kind: str
    group: str
    trainings: int
    trained: str
    source: str | None
    cnr: Measure | None
    auc_roc: Measure | None
    fidelity: GroupScore | None


def encoder_rows(metrics: Mapping[str, Any] | ReportRecords) -> list[EncoderRow]:
    """The setting groups by text encoder × frozen/learnable, when some run was conditioned on another text
    encoder than its base model's (`finetune --text-encoder`); else none."""
    groups = read_metrics(metrics).groups
    if not any(v.setting.encoder for v in groups.values()):
        return []
    from cxrdiff.text_encoders import label

    rows = []
    for g, v in groups.items():
        average = v.grounding.average_or_empty
        rows.append(
            EncoderRow(
                encoder=v.setting.encoder or label(None),
                kind=v.setting.text_encoder or "base model",
                group=g,
                trainings=v.trainings,
                trained=v.setting.trained or "—",
                source=v.setting.prompt_source,
                cnr=average.cnr,
                auc_roc=average.auc_roc,
                fidelity=v.first_fidelity,
            )
        )
    order = {"frozen": 0, "learnable": 1, "base model": 2}
    return sorted(rows, key=lambda r: (r.encoder, order.get(r.kind, 3), r.group))


def _encoder_table(records: ReportRecords) -> Table | None:
    """CNR, AUC-ROC and fidelity by text encoder × frozen/learnable (runs conditioned on other encoders)."""
    rows = encoder_rows(records)
    if not rows:
        return None
    body = []
    for r in rows:
        f = r.fidelity
        fidelity = f"{f.title} {_over(f, 1, 1)}" if f and f.mean is not None else "—"
        text = "" if r.source in (None, "impression") else f", {source_name(r.source)}"
        body.append([r.encoder, r.kind + text, _group_label(r.group, r.trainings), r.trained,
                     _over(r.cnr), _over(r.auc_roc, 100, 1), fidelity])  # fmt: skip
    return Table(
        "By text encoder: average CNR, AUC-ROC % and fidelity, frozen and learnable",
        ["text encoder", "kind", "model", "trained", "CNR", "AUC-ROC %", "fidelity (lower is closer to real)"],
        body,
        "Each row a setting group (its runs differ only in seed). The base model's CLIP is SD's own text encoder; "
        "another encoder's hidden states reach the UNet through a learned linear map where its width differs "
        '(docs/method.md, "Text encoders"). ' + _trainings_note(records),
    )


def text_encoder_figure(metrics: Mapping[str, Any] | ReportRecords) -> bytes | None:
    """Three panels (CNR, AUC-ROC %, fidelity): per text encoder, a bar for frozen and one for learnable
    (impression-trained groups), error bars over trainings."""
    rows = [r for r in encoder_rows(metrics) if r.kind in KIND_COLOURS and r.source in (None, "impression")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoders = list(dict.fromkeys(r.encoder for r in rows))
    fidelity_title = next((r.fidelity.title for r in rows if r.fidelity), None)
    panels: tuple[tuple[str, Callable[[EncoderRow], Measure | None], float], ...] = (
        ("CNR (average)", lambda r: r.cnr, 1.0),
        ("AUC-ROC % (average)", lambda r: r.auc_roc, 100.0),
        (f"{fidelity_title or 'fidelity'} (lower is closer to real)", lambda r: r.fidelity, 1.0),
    )
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")
    x = np.arange(len(encoders))
    for ax, (title, pick, scale) in zip(axes, panels, strict=True):
        for i, kind in enumerate(KIND_COLOURS):
            cells = [next((pick(r) for r in rows if r.encoder == e and r.kind == kind), None) for e in encoders]
            means = [np.nan if not c or c.mean is None else c.mean * scale for c in cells]
            stds = [0.0 if not c or not c.std else c.std * scale for c in cells]
            ax.bar(x + (i - 0.5) * 0.38, means, 0.38, yerr=stds, capsize=3, color=KIND_COLOURS[kind], label=kind)
        ax.set_xticks(x, encoders, fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].axhline(0, color="black", linewidth=0.6)
    axes[0].legend(fontsize=7, title="text encoder", title_fontsize=7)
    return _png(fig)


def _other_sources_note(records: ReportRecords) -> str:
    """How runs trained on another text than impressions were measured (`report --other-sources`)."""
    if records.settings.get("other_sources", "grounding") == "full":
        return "Runs trained on other texts were also sampled and scored for fidelity (--other-sources full). "
    return (
        "Runs trained on other texts than impressions are grounded only, as the paper measures them; "
        "--other-sources full also samples them for fidelity. "
    )


def _eos_table(records: ReportRecords) -> Table | None:
    """The end-of-text token's CNR over all classes beside the class words' CNR, per group."""
    groups = records.groups
    if not groups:
        return None
    published = {"learnable": PUBLISHED_EOS_CNR.get("Finetune_L"), "frozen": PUBLISHED_EOS_CNR.get("Finetune_F")}
    rows = []
    for g, v in groups.items():
        encoder = v.setting.text_encoder
        paper_model = v.setting.prompt_source == "impression" and v.setting.training in (None, "full")  # the paper's
        paper = published.get(encoder or "") if paper_model else None
        rows.append(
            [
                _group_label(g, v.trainings),
                encoder or "base model",
                _over(v.eos_cnr),
                _over(v.class_word_cnr),
                _pub(paper) if paper is not None else "—",
            ]
        )
    return Table(
        "EOS token vs class words: CNR over all classes",
        ["model", "text encoder", "<EOS> CNR (this report)", "class words CNR (this report)", "<EOS> CNR (published)"],
        rows,
        f"Published: the text of {PAPER} (Finetune_L 0.68, Finetune_F 0.72). " + _trainings_note(records),
    )


def _class_cnr(entry: Localization | None) -> Measure:
    return (entry.cnr if entry else None) or Measure(None)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=bounded_dpi(fig, 110), bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


_LABEL = {"textcoords": "offset points", "fontsize": 7}


def tradeoff_figure(metrics: Mapping[str, Any] | ReportRecords) -> bytes:
    """Fidelity against CNR: the paper's three models (Tables 1, 4) on the left; on the right every run of
    this report (small, with its 95% bootstrap intervals) and every setting group (large, ± over trainings),
    the paper's CNRs as dotted lines.
    Two panels because the paper's FID and this report's measure need not be the same distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for m, (fid_value, _, _) in PUBLISHED_FIDELITY.items():
        left.scatter(PUBLISHED_LOCALIZATION[m]["Average"][2], fid_value, marker="s", color="black")
        left.annotate(m, (PUBLISHED_LOCALIZATION[m]["Average"][2], fid_value), xytext=(-10, 6), **_LABEL)
    left.set(xlabel="CNR (average)", ylabel="FID", title="published (Tables 1 and 4)")
    ylabel = None
    for n, r in records.runs.items():
        cnr, fid_entry = _average_cnr(r.grounding.average), r.first_fidelity
        if cnr.mean is None or fid_entry is None:
            continue
        ylabel = fid_entry.title
        xerr = _half_widths(cnr.mean, r.grounding.interval("Average", "cnr"))
        yerr = _half_widths(fid_entry.value, fid_entry.interval)
        right.errorbar(
            cnr.mean,
            fid_entry.value,
            xerr=xerr,
            yerr=yerr,
            fmt="^" if r.setting.lora else "o",
            ms=4,
            alpha=0.7,
            capsize=2,
            elinewidth=0.8,
        )  # fmt: skip  (LoRA runs: triangles)
        right.annotate(n, (cnr.mean, fid_entry.value), xytext=(4, 4), **_LABEL)
    for g, v in records.groups.items():
        if v.trainings < 2:  # a group of one training is its run, drawn above
            continue
        cnr, first = _average_cnr(v.grounding.average), v.first_fidelity
        if cnr.mean is None or first is None or first.mean is None:
            continue
        right.errorbar(cnr.mean, first.mean, xerr=cnr.std or 0, yerr=first.std or 0,
                       fmt="^" if v.setting.lora else "o", ms=9, capsize=3)  # fmt: skip
        right.annotate(f"{g} (mean)", (cnr.mean, first.mean), xytext=(4, -12), fontweight="bold", **_LABEL)
    for m, style in (("Finetune_F", ":"), ("Finetune_L", "-.")):
        x = PUBLISHED_LOCALIZATION[m]["Average"][2]
        right.axvline(x, color="grey", linestyle=style, linewidth=1, label=f"{m} CNR (published)")
    right.legend(fontsize=7, loc="best")
    right.set(xlabel="CNR (average)", ylabel=ylabel or "fidelity", title="this report (lower is closer to real)")
    return _png(fig)


def _average_cnr(average: Localization | None) -> Measure:
    """The average CNR of a run or group, its mean None where it was not measured."""
    return (average.cnr if average else None) or Measure(None)


def _half_widths(value: float, interval: Mapping[str, Any] | None) -> Any:
    """An interval as matplotlib's (2, 1) error-bar lengths below and above the value; None without one."""
    if not interval or interval.get("low") is None or interval.get("high") is None:
        return None
    return [[max(value - interval["low"], 0.0)], [max(interval["high"] - value, 0.0)]]


KIND_COLOURS = {"frozen": "tab:blue", "learnable": "tab:orange"}  # the paper's model of that kind alike


def _text_encoder(entry: RunResult | TrainingGroup) -> str | None:
    """frozen / learnable for a run or a setting group, None for a base model (its bars take the next colour)."""
    frozen = entry.training.frozen_text if isinstance(entry, RunResult) else None
    return entry.setting.text_encoder or (None if frozen is None else "frozen" if frozen else "learnable")


def cnr_by_class_figure(metrics: Mapping[str, Any] | ReportRecords) -> tuple[bytes, str] | None:
    """Per-class CNR bars for each model with error bars, and the paper's Finetune_F / Finetune_L (with their
    ± over trainings). Error bars: over trainings for setting groups of two or more trainings, else over
    grounding noise seeds (a run's std); the caption says which. None when nothing was grounded."""
    records = read_metrics(metrics)
    groups = {g: v for g, v in records.groups.items() if v.trainings > 1}
    source: Mapping[str, RunResult | TrainingGroup] = groups or {n: r for n, r in records.runs.items() if r.grounded}
    if not source:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = shown_classes(records.metrics)
    bars: dict[str, tuple[list[float], list[float], str | None]] = {}
    for m, kind in (("Finetune_F", "frozen"), ("Finetune_L", "learnable")):
        published, stds = PUBLISHED_LOCALIZATION[m], PUBLISHED_LOCALIZATION_STD[m]
        bars[f"{m} (published)"] = (  # no bar for a class the paper does not have
            [published[c][2] if c in published else np.nan for c in shown],
            [stds[c][2] if c in stds else 0 for c in shown],
            KIND_COLOURS[kind],
        )
    for n, v in source.items():
        cells = [_class_cnr(v.grounding.at(c)) for c in shown]
        label = f"{n} ({v.trainings} trainings)" if isinstance(v, TrainingGroup) else n
        bars[label] = (
            [np.nan if e.mean is None else e.mean for e in cells],
            [e.std or 0 for e in cells],
            KIND_COLOURS.get(_text_encoder(v)),  # type: ignore[arg-type]
        )
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / len(bars)
    x = np.arange(len(shown))
    lighter: dict[str | None, int] = {}
    for i, (label, (means, stds, colour)) in enumerate(bars.items()):
        published = "published" in label
        alpha = 0.9 if published else max(0.9 - 0.25 * lighter.get(colour, 0), 0.3)  # one kind: lighter each
        lighter[colour] = lighter.get(colour, 0) + (not published)
        style = {"hatch": "//", "facecolor": "white", "edgecolor": colour} if published else {"color": colour}
        ax.bar(x + i * width, means, width, yerr=stds, capsize=2, label=label, alpha=alpha, **style)
    ax.set_xticks(x + 0.4 - width / 2, [c.replace(" ", "\n") for c in shown], fontsize=8)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set(ylabel="CNR", title="CNR per class")
    ax.legend(fontsize=7, ncol=2)
    over = (
        "trainings (each setting group's std)"
        if groups
        else "grounding noise seeds (`--noise-seeds`; none with one seed: the tables' intervals are over phrases)"
    )
    caption = (
        "Per-class CNR, this report's models beside the paper's (hatched, Table 1, ± over three trainings; frozen "
        "text encoders in blue, learnable in orange). "
        f"Error bars of this report: ± over {over}.{class_note(records.metrics)}"
    )
    return _png(fig), caption


def checkpoint_figure(metrics: Mapping[str, Any] | ReportRecords) -> bytes | None:
    """CNR and fidelity against training steps, one line per run (frozen and learnable side by side), from
    `report --checkpoints`; None when no run has a curve."""
    curves = {n: r.checkpoints for n, r in read_metrics(metrics).runs.items() if r.checkpoints}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    ylabel = "fidelity"
    for n, points in curves.items():
        cnr = [(p.step, p.cnr.mean) for p in points if p.cnr]
        fidelity = [(p.step, p.fidelity.value) for p in points if p.fidelity]
        if cnr:
            left.plot(*zip(*cnr, strict=True), marker="o", label=n)
        if fidelity:
            ylabel = next(p.fidelity.title for p in points if p.fidelity)
            right.plot(*zip(*fidelity, strict=True), marker="o", label=n)
    left.set(xlabel="training step", ylabel="CNR (average)", title="interpretability over training")
    right.set(xlabel="training step", ylabel=ylabel, title="fidelity over training (lower is closer to real)")
    left.legend(fontsize=8)
    return _png(fig)


def grounding_figure(metrics: Mapping[str, Any] | ReportRecords) -> bytes | None:
    """One overlay per class (columns) for each run (rows): e.g. frozen vs learnable; 2.6 inches a cell at
    110 dpi (about 290 px), pixels kept sharp, so a 64 px overlay's box lines stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    records = read_metrics(metrics)
    runs = {n: r.overlays for n, r in records.runs.items()}
    classes = [c for c in shown_classes(records.metrics) if any(o.get(c) for o in runs.values())]
    if not classes:
        return None
    fig, axes = plt.subplots(len(runs), len(classes), figsize=(2.6 * len(classes), 2.8 * len(runs)), squeeze=False)
    for i, (n, overlays) in enumerate(runs.items()):
        for j, c in enumerate(classes):
            ax = axes[i][j]
            ax.axis("off")
            if overlays.get(c) and Path(overlays[c][0]).is_file():
                ax.imshow(np.asarray(Image.open(overlays[c][0]).convert("RGB")), interpolation="nearest")
            if i == 0:
                ax.set_title(c, fontsize=8)
            if j == 0:
                ax.text(-0.1, 0.5, n, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=8)
    return _png(fig)


def render(metrics: Mapping[str, Any], out: str | os.PathLike) -> list[Path]:
    """Write metrics.json, report.md and a self-contained report.html (and the figures' PNGs) from the
    metrics dict; returns the files written."""
    out = Path(out)
    records = read_metrics(metrics)
    tabs = tables(records)
    over_training = page.checkpoint_table(records)
    if over_training is not None:
        tabs.append(over_training)
    by_class = cnr_by_class_figure(records)
    made = {
        "trade-off": (tradeoff_figure(records), page.CAPTIONS["trade-off"]),
        "cnr-by-class": by_class,
        "checkpoints": (checkpoint_figure(records), page.CAPTIONS["checkpoints"]),
        "grounding": (grounding_figure(records), page.CAPTIONS["grounding"]),
        "text-encoders": (text_encoder_figure(records), page.CAPTIONS["text-encoders"]),
    }
    made.update(privacy_figures(metrics))
    figures = {name: fig for name, fig in made.items() if fig is not None and fig[0] is not None}
    write_json(out / "metrics.json", metrics)
    for name, (png, _) in figures.items():
        write_bytes(out / f"{name}.png", png)
    lines, summary = page.headline(records)
    doc = Page(
        title=TITLE,
        sources=SOURCES,
        banner=(
            f"**Warning: some Fréchet distances use randomly initialised networks ({UNTRAINED_LABEL}).**"
            if records.untrained
            else ""
        ),
        headline=lines,
        summary=summary,
        figures=figures,
        sections=page.sections(tabs, list(figures)),
        settings=page.settings_tables(records),
        protocol=[*PROTOCOL, *page.conventions(records)],
    )
    write_text(out / "report.md", markdown(doc))
    write_text(out / "report.html", html(doc))
    return [out / "metrics.json", out / "report.md", out / "report.html"] + [out / f"{n}.png" for n in figures]


FID_NOT_COMPARABLE = (
    "The published FIDs came from code that normalised the Inception inputs twice: their absolute values are not "
    "comparable with cxrdiff's standard torch-fidelity FID; docs/method.md gives the size of the difference on "
    "the same images. Compare models within one source only."
)
TITLE = "cxrdiff report: accuracy vs interpretability"
SOURCES = f"Published numbers are from {PAPER}, labelled with their table; all others were measured here."
