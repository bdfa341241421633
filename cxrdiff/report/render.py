"""The report's rendering: a pure function from the metrics dict to metrics.json, report.md and a
self-contained report.html (figures inlined as base64 PNG), with the paper's tables beside the runs.

Pure so that it can be tested (and re-run on a saved metrics.json) without any model or step folder.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import write_bytes, write_json, write_text
from cxrdiff.data import MS_CXR_CATEGORIES
from cxrdiff.metrics.score import UNTRAINED_LABEL, Score
from cxrdiff.report.published import (
    CLASSIFIER_ORDER,
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
    WORDS_MIN_COUNT,
)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def _pub(value: float) -> str:
    """A published number as printed in the paper (no added or dropped digits)."""
    return f"{value:g}"


def _mean(entry: Any, scale: float = 1.0, digits: int = 1) -> str:
    if not entry:
        return "—"
    mean, std = entry.get("mean"), entry.get("std")
    text = _fmt(None if mean is None else mean * scale, digits)
    return text + (f" ± {std * scale:.{digits}f}" if std else "")


@dataclasses.dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "---|" * len(self.headers))
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in self.rows]
        if self.note:
            lines += ["", f"*{self.note}*"]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        note = f'<p class="note">{html.escape(self.note)}</p>' if self.note else ""
        table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        return f"<h3>{html.escape(self.title)}</h3>{table}{note}"


def _score_cell(entry: Mapping[str, Any] | None, digits: int = 1) -> str:
    return Score.from_dict(dict(entry)).text(digits) if entry else "—"


def tables(metrics: Mapping[str, Any]) -> list[Table]:
    """The paper's tables (published numbers labelled with their source) beside this report's runs."""
    runs = metrics.get("runs", {})
    return [
        _localization_table(runs),
        _cnr_table(runs),
        _fidelity_table(runs),
        _classifier_table(metrics),
        _published_word_table(),
        _word_table(runs),
        _text_source_table(),
    ]


def _grounding_entry(run: Mapping[str, Any], category: str) -> Mapping[str, Any] | None:
    g = run.get("grounding", {})
    return g.get("average") if category == "Average" else g.get("classes", {}).get(category)


def _localization_table(runs: Mapping[str, Any]) -> Table:
    headers = (
        ["class"] + [f"{m} (published, Table 1)" for m in PUBLISHED_LOCALIZATION] + [f"{n} (this report)" for n in runs]
    )
    rows = []
    for c in [*MS_CXR_CATEGORIES, "Average"]:
        row = [c] + [_published_localization(m, c) for m in PUBLISHED_LOCALIZATION]
        for r in runs.values():
            e = _grounding_entry(r, c)
            row.append(
                " / ".join((_mean(e.get("auc_roc"), 100), _mean(e.get("top1"), 100), _mean(e.get("cnr"), 1, 2)))
                if e
                else "—"
            )
        rows.append(row)
    return Table(
        "Localization on MS-CXR: AUC-ROC % / Top-1 % / CNR",
        headers,
        rows,
        f"Published: {PAPER}, Table 1 (± over three trainings; SDv2 has none). Measured ± (if any) is over "
        "grounding seeds, not trainings. Boxes: the union of an image's boxes of the class.",
    )


def _published_localization(method: str, category: str) -> str:
    """Table 1's cell as printed: mean ± std of each metric when the paper gives a std."""
    means = PUBLISHED_LOCALIZATION[method][category]
    stds = PUBLISHED_LOCALIZATION_STD.get(method, {}).get(category)
    if stds is None:
        return " / ".join(_pub(v) for v in means)
    return " / ".join(f"{_pub(m)} ± {_pub(s)}" for m, s in zip(means, stds, strict=True))


def _cnr_table(runs: Mapping[str, Any]) -> Table:
    """Table 3: phrase grounding, so each phrase is scored against its own boxes (`--boxes per-phrase`)."""
    headers = ["class"] + [f"{m} (published, Table 3)" for m in PUBLISHED_CNR_METHODS] + [f"{n} CNR" for n in runs]
    rows = []
    for c in [*MS_CXR_CATEGORIES, "Average"]:
        row = [c] + [_pub(PUBLISHED_CNR_METHODS[m][c]) for m in PUBLISHED_CNR_METHODS]
        for r in runs.values():
            per_phrase = r.get("grounding_per_phrase") or {"same_as_union": True}
            e = _grounding_entry(r if per_phrase.get("same_as_union") else {"grounding": per_phrase}, c)
            row.append(_mean(e.get("cnr"), 1, 2) if e else "—")
        rows.append(row)
    same = all((r.get("grounding_per_phrase") or {"same_as_union": True}).get("same_as_union") for r in runs.values())
    boxes = "Measured per phrase (each phrase against its own boxes, `--boxes per-phrase`)" + (
        "; on these data no image and class has two phrases, so it equals Table 1's union scoring." if same else "."
    )
    return Table(
        "CNR against published phrase-grounding methods",
        headers,
        rows,
        f"Published: Table 3 of {PAPER}; BioViL-T reports 1.33 ± 0.04 average. {boxes}",
    )


def _fidelity_table(runs: Mapping[str, Any]) -> Table:
    titles: dict[str, str] = {}
    for r in runs.values():
        for s in r.get("fidelity", []):
            titles.setdefault(s["name"], Score.from_dict(s).title)
    names = ["FID", "FID_XRV"] + [n for n in titles if n not in ("FID", "FID_XRV")]
    headers = ["model", "source"] + [titles.get(n, n) for n in names] + ["MS-SSIM %"]
    headers[2] += ": published values not comparable, see note"
    rows = []
    for source, table in (("MIMIC p19 prompts", PUBLISHED_FIDELITY), ("MS-CXR phrases", PUBLISHED_FIDELITY_MS_CXR)):
        for m, (f1, f2, ms) in table.items():
            row = [m, f"published, Table 4 ({source})", _pub(f1), _pub(f2)]
            rows.append(row + ["—"] * (len(names) - 2) + [_pub(ms)])
    for n, r in runs.items():
        by_name = {s["name"]: s for s in r.get("fidelity", [])}
        rows.append(
            [n, "this report"] + [_score_cell(by_name.get(k)) for k in names] + [_score_cell(r.get("diversity"))]
        )
    div = next((r["diversity"]["protocol"] for r in runs.values() if r.get("diversity")), None)
    note = (
        f"Published: Table 4 of {PAPER} (512 px, 5,000 images). {FID_NOT_COMPARABLE} This report's images "
        "come from the MIMIC p19 prompts."
    )
    if div:
        note += (
            f" MS-SSIM here: {div.get('scales')} scales, {div.get('kernel_size')}-px window σ {div.get('sigma'):.2f}, "
            f"data range {div.get('data_range'):g}, {div.get('prompts')} prompts × 6 pairs."
        )
    return Table("Fidelity and diversity", headers, rows, note)


def _classifier_table(metrics: Mapping[str, Any]) -> Table:
    headers = ["images", "source", *CLASSIFIER_ORDER]
    rows = [[m, "published, Table 5"] + [_pub(v[c]) for c in CLASSIFIER_ORDER] for m, v in PUBLISHED_CLASSIFIER.items()]
    if metrics.get("real", {}).get("classifier"):
        rows.append(
            ["real p19 (reference)", "this report"]
            + [_score_cell(metrics["real"]["classifier"].get(c)) for c in CLASSIFIER_ORDER]
        )
    for n, r in metrics.get("runs", {}).items():
        if r.get("classifier"):
            rows.append([n, "this report"] + [_score_cell(r["classifier"].get(c)) for c in CLASSIFIER_ORDER])
    rule = (metrics.get("settings") or {}).get("classifier_positives", "only")
    positives = (
        "images whose only label is d, against images whose only label is No Finding (the paper's protocol)"
        if rule == "only"
        else "every image labelled d, against every image labelled No Finding (`--classifier-positives any`)"
    )
    return Table(
        "Classifier AUC %: class d vs No Finding",
        headers,
        rows,
        f"Classifier here: {metrics.get('classifier') or 'none'}; positives: {positives}. Published: Table 5 of "
        f"{PAPER}, torchxrayvision.",
    )


def _published_word_table() -> Table:
    """Table 6 as published: word (occurrences in the class, mean CNR), best first."""
    rows = [
        [m, c, ", ".join(f"{w} ({n}, {_pub(cnr)})" for w, n, cnr in words)]
        for m, table in PUBLISHED_WORDS.items()
        for c, words in table.items()
    ]
    eos = ", ".join(f"{m} {_pub(v)}" for m, v in PUBLISHED_EOS_CNR.items())
    return Table(
        "Word analysis (published, Table 6): the words with the highest mean CNR per class",
        ["model", "class", "top words (occurrences in the class, mean CNR)"],
        rows,
        f"Published: Table 6 of {PAPER}: words occurring more than {WORDS_MIN_COUNT} times in the class's "
        "phrases, case kept, SOS and EOS included. Finetune_L: EOS tops 7 of 8 classes (only Pneumothorax is "
        f"listed here); SDv2: the best word only. The EOS token's CNR over all classes: {eos}.",
    )


def _word_table(runs: Mapping[str, Any]) -> Table:
    rows, thresholds = [], set()
    for n, r in runs.items():
        analysis = r.get("grounding", {}).get("word_analysis", {})
        if "min_count" in analysis:
            thresholds.add(analysis["min_count"])
        own = analysis.get("class_words", {})
        for c, words in analysis.get("top3", {}).items():
            listed = ", ".join(f"{w['word']} ({w['n']}, {w['cnr']:.2f})" for w in own.get(c, [])) or "—"
            rows.append([n, c, ", ".join(f"{w['word']} ({w['n']}, {w['cnr']:.2f})" for w in words), listed])
        if analysis.get("eos_cnr") is not None:
            rows.append([n, "EOS over all classes", f"<EOS> ({analysis['eos_cnr']:.2f})", ""])
    threshold = " / ".join(str(t) for t in sorted(thresholds)) or "—"
    return Table(
        "Word analysis (this report): the 3 words with the highest mean CNR per class",
        ["model", "class", "top words (occurrences in the class, mean CNR)", "the class's own words among the ranked"],
        rows,
        "Counted as the paper did (per class, case kept, <SOS> and <EOS> included); threshold used: a word ranks "
        f"when it occurs in more than {threshold} of the class's phrases (the paper: {WORDS_MIN_COUNT}, over "
        "MS-CXR's 1,162 phrases; a smaller phrase set scales it).",
    )


def _text_source_table() -> Table:
    rows = [[src, _pub(a), _pub(b)] for src, (a, b) in PUBLISHED_TEXT_SOURCE.items()]
    return Table("CNR by training text (published, Table 7)", ["text", "learnable", "frozen"], rows)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def tradeoff_figure(metrics: Mapping[str, Any]) -> bytes:
    """Fidelity against CNR: the paper's three models (Tables 1, 4) and this report's runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for m, (fid_value, _, _) in PUBLISHED_FIDELITY.items():
        left.scatter(PUBLISHED_LOCALIZATION[m]["Average"][2], fid_value)
        left.annotate(m, (PUBLISHED_LOCALIZATION[m]["Average"][2], fid_value))
    left.set(xlabel="CNR (average)", ylabel="FID", title="published (Tables 1 and 4)")
    ylabel = None
    for n, r in metrics.get("runs", {}).items():
        cnr = (r.get("grounding", {}).get("average") or {}).get("cnr", {}).get("mean")
        fid_entry = (r.get("fidelity") or [None])[0]
        if cnr is None or fid_entry is None:
            continue
        ylabel = Score.from_dict(fid_entry).title
        right.scatter(cnr, fid_entry["value"])
        right.annotate(n, (cnr, fid_entry["value"]))
    right.set(xlabel="CNR (average)", ylabel=ylabel or "fidelity", title="this report (lower is closer to real)")
    return _png(fig)


def checkpoint_figure(metrics: Mapping[str, Any]) -> bytes | None:
    """CNR and fidelity against training steps, one line per run (frozen and learnable side by side), from
    `report --checkpoints`; None when no run has a curve."""
    curves = {n: r["checkpoints"] for n, r in metrics.get("runs", {}).items() if r.get("checkpoints")}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    ylabel = "fidelity"
    for n, points in curves.items():
        cnr = [(p["step"], p["grounding"]["cnr"]["mean"]) for p in points if (p.get("grounding") or {}).get("cnr")]
        fidelity = [(p["step"], p["fidelity"]["value"]) for p in points if p.get("fidelity")]
        if cnr:
            left.plot(*zip(*cnr, strict=True), marker="o", label=n)
        if fidelity:
            ylabel = Score.from_dict(next(p["fidelity"] for p in points if p.get("fidelity"))).title
            right.plot(*zip(*fidelity, strict=True), marker="o", label=n)
    left.set(xlabel="training step", ylabel="CNR (average)", title="interpretability over training")
    right.set(xlabel="training step", ylabel=ylabel, title="fidelity over training (lower is closer to real)")
    left.legend(fontsize=8)
    return _png(fig)


def grounding_figure(metrics: Mapping[str, Any]) -> bytes | None:
    """One overlay per class (columns) for each run (rows): e.g. frozen vs learnable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    runs = {n: r.get("overlays", {}) for n, r in metrics.get("runs", {}).items()}
    classes = [c for c in MS_CXR_CATEGORIES if any(o.get(c) for o in runs.values())]
    if not classes:
        return None
    fig, axes = plt.subplots(len(runs), len(classes), figsize=(1.8 * len(classes), 2.0 * len(runs)), squeeze=False)
    for i, (n, overlays) in enumerate(runs.items()):
        for j, c in enumerate(classes):
            ax = axes[i][j]
            ax.axis("off")
            if overlays.get(c) and Path(overlays[c][0]).is_file():
                ax.imshow(np.asarray(Image.open(overlays[c][0]).convert("RGB")))
            if i == 0:
                ax.set_title(c, fontsize=8)
            if j == 0:
                ax.text(-0.1, 0.5, n, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=8)
    return _png(fig)


def _untrained(metrics: Mapping[str, Any]) -> bool:
    return UNTRAINED_LABEL in json.dumps(metrics, default=str)


def render(metrics: Mapping[str, Any], out: str | os.PathLike) -> list[Path]:
    """Write metrics.json, report.md and a self-contained report.html (and the figures' PNGs) from the
    metrics dict; returns the files written."""
    out = Path(out)
    tabs = tables(metrics)
    figures = {
        "trade-off": tradeoff_figure(metrics),
        "checkpoints": checkpoint_figure(metrics),
        "grounding": grounding_figure(metrics),
    }
    figures = {name: png for name, png in figures.items() if png is not None}
    write_json(out / "metrics.json", metrics)
    for name, png in figures.items():
        write_bytes(out / f"{name}.png", png)
    banner = (
        f"**Warning: some Fréchet distances use randomly initialised networks ({UNTRAINED_LABEL}).**"
        if _untrained(metrics)
        else ""
    )
    runs = [
        f"**{n}** ({r.get('kind')}, {r.get('path')}): training {json.dumps(r.get('training', {}))}; "
        f"sampling {json.dumps(r.get('sampling', {}))}; "
        f"grounding {json.dumps(r.get('grounding', {}).get('conventions', {}))}"
        for n, r in metrics.get("runs", {}).items()
    ]
    write_text(out / "report.md", _markdown(tabs, list(figures), banner, runs))
    write_text(out / "report.html", _html(tabs, figures, banner, runs))
    return [out / "metrics.json", out / "report.md", out / "report.html"] + [out / f"{n}.png" for n in figures]


FID_NOT_COMPARABLE = (
    "The published FIDs came from code that normalised the Inception inputs twice: their absolute values are not "
    "comparable with cxrdiff's standard torch-fidelity FID; docs/method.md gives the size of the difference on "
    "the same images. Compare models within one source only."
)
TITLE = "cxrdiff report: accuracy vs interpretability"
SOURCES = f"Published numbers are from {PAPER}, labelled with their table; all others were measured here."
STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #999;padding:3px 6px;font-size:13px}th{background:#eee}.note{color:#555;font-size:12px}"
    ".warn{background:#fdd;padding:6px;font-weight:bold}img{max-width:100%}"
)


def _markdown(tabs: list[Table], figures: list[str], banner: str, runs: list[str]) -> str:
    """report.md: figures as links to the PNG files beside it."""
    md = [f"# {TITLE}", ""]
    if banner:
        md += [banner, ""]
    md += [SOURCES, ""]
    md += [t.markdown() for t in tabs]
    for name in figures:
        md += [f"![{name}]({name}.png)", ""]
    md += ["## Protocol", ""] + [f"- {p}" for p in PROTOCOL] + ["", "## Runs", ""] + [f"- {r}" for r in runs]
    return "\n".join(md) + "\n"


def _html(tabs: list[Table], figures: Mapping[str, bytes], banner: str, runs: list[str]) -> str:
    """report.html: one file, figures inlined, nothing fetched from the network."""
    body = [f"<h1>{html.escape(TITLE)}</h1>"]
    if banner:
        body.append(f'<p class="warn">{html.escape(banner.strip("*"))}</p>')
    body.append(f"<p>{html.escape(SOURCES)}</p>")
    body += [t.html() for t in tabs]
    for name, png in figures.items():
        data = base64.b64encode(png).decode()
        body.append(f'<h3>{html.escape(name)}</h3><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
    body.append("<h2>Protocol</h2><ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in PROTOCOL) + "</ul>")
    body.append("<h2>Runs</h2><ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in runs) + "</ul>")
    head = f'<meta charset="utf-8"><title>cxrdiff report</title><style>{STYLE}</style>'
    return f"<!DOCTYPE html><html><head>{head}</head><body>{''.join(body)}</body></html>"
