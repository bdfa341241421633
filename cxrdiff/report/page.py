"""The report as people read it: a headline in plain words, sections that put each figure beside the tables
it summarises, the run settings as small tables and every convention named once.

`render.py` builds the paper's tables and the figures; this module decides what is said first and where
each piece goes. Pure functions of the report's records (`records.read_metrics`), like the rest of the rendering.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrdiff.metrics.score import Score
from cxrdiff.report.document import Table, literal
from cxrdiff.report.published import PAPER, PUBLISHED_FIDELITY, PUBLISHED_LOCALIZATION, PUBLISHED_TEXT_SOURCE
from cxrdiff.report.records import (
    GroupScore,
    ReportRecords,
    RunResult,
    TrainingGroup,
    read_metrics,
)
from cxrdiff.report.text_source import source_name

PUBLISHED_OF = {"frozen": "Finetune_F", "learnable": "Finetune_L", "base model": "SDv2"}
PUBLISHED_STEPS = {"Finetune_F": 30_000, "Finetune_L": 60_000}  # the paper's training lengths

# Each section: its heading, its figures (file stems) and the tables it holds (title prefixes), in page order.
# A table no section claims lands in the last, "Other measurements".
SECTIONS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("Localization on MS-CXR (Tables 1 and 3)", ("cnr-by-class", "grounding"), ("Localization", "CNR against")),
    ("Text encoders", ("text-encoders",), ("By text encoder",)),
    ("Fidelity and diversity (Tables 4 and 5)", (), ("Fidelity", "Classifier")),
    ("Privacy: does the model copy its training images?", ("privacy-pairs", "privacy-over-training"), ("Privacy",)),
    ("Over training (checkpoints)", ("checkpoints",), ("Over training",)),
    ("Words (Table 6) and the end-of-text token", (), ("Word analysis", "EOS")),
    ("Training text (Table 7)", (), ("CNR by training text",)),
)
CAPTIONS = {
    "trade-off": "CNR (interpretability) against fidelity (lower is closer to real images): left the paper's three "
    "models (Tables 1 and 4), right every run (small, bars: its 95% bootstrap intervals) and setting group (large, "
    "± over trainings) of this report, "
    "LoRA runs as triangles; dotted lines mark the paper's average CNR of Finetune_F and Finetune_L.",
    "grounding": "One overlay per class (columns) for each run (rows): the class words' cross-attention map over the "
    "image, MS-CXR boxes drawn.",
    "checkpoints": "Average CNR and fidelity of each run's kept checkpoints against training steps, frozen and "
    "learnable on one figure (the newest point of each run is the run's own model).",
    "text-encoders": "Average CNR, AUC-ROC % and fidelity by text encoder, frozen (blue) and learnable (orange); "
    "setting groups trained on impressions, error bars over trainings where a group has several.",
}


# --- the models the headline speaks of -------------------------------------------------------------


def _kind(entry: RunResult | TrainingGroup) -> str:
    """frozen / learnable / base model, from a group's setting or a run's training record (a group records
    no text encoder only for base models); a LoRA run is its own kind ('frozen + LoRA r16'), which the paper
    has no counterpart of and the trade-off verdict does not take for the paper's models."""
    setting = entry.setting
    if setting.text_encoder and setting.lora:
        return f"{setting.text_encoder} + {setting.training}"
    if setting.text_encoder:
        return str(setting.text_encoder)
    if isinstance(entry, TrainingGroup):
        return "base model"
    if entry.training.frozen_text is not None:
        return "frozen" if entry.training.frozen_text else "learnable"
    return "base model" if entry.kind == "base model" else "fine-tuned"


@dataclass(frozen=True)
class Fidelity:
    """The fidelity number a model is judged by: a run's first score, or a group's mean of it over trainings
    (`n` of them; None for a run) with the interval over trainings."""

    name: str
    title: str
    value: float | None
    label: str | None = None
    std: float | None = None
    n: int | None = None
    interval: Mapping[str, Any] | None = None
    protocol: Mapping[str, Any] = field(default_factory=dict)  # a run's: how the score was made (n images)

    @classmethod
    def of_run(cls, score: Score | None) -> Fidelity | None:
        if score is None:
            return None
        return cls(score.name, score.title, score.value, score.label, score.std, None, score.interval, score.protocol)

    @classmethod
    def of_group(cls, score: GroupScore | None, interval: Mapping[str, Any] | None) -> Fidelity | None:
        if score is None:
            return None
        return cls(score.name, score.title, score.mean, score.label, score.std, score.n, interval)


@dataclass(frozen=True)
class Model:
    """One model as the headline speaks of it: a setting group (means over trainings) or a run."""

    name: str
    uncertainty: Mapping[str, Any]  # metric -> Interval dict (CNR, AUC-ROC, fidelity)
    kind: str
    encoder: str | None  # None: the base model's own CLIP
    trainings: int
    source: str | None
    base: str | None
    cnr: tuple[float | None, float | None]
    auc: tuple[float | None, float | None]
    fidelity: Fidelity | None
    text_cnr: float | None  # Table 7: CNR on the phrases that contain their label


def models(metrics: Mapping[str, Any] | ReportRecords) -> list[Model]:
    """Each model the report measured, as the headline needs it: setting groups when there are any (means over
    trainings), else the runs. Fidelity is the first measure of the run (the one drawn in the trade-off)."""
    records = read_metrics(metrics)
    out = []
    entries: Mapping[str, RunResult | TrainingGroup] = records.groups or records.runs
    for name, entry in entries.items():
        average = entry.grounding.average_or_empty
        uncertainty = _uncertainty(records, name, entry)
        if isinstance(entry, TrainingGroup):
            fidelity = Fidelity.of_group(entry.first_fidelity, uncertainty.get("fidelity"))
            text_cnr = entry.text_cnr.mean if entry.text_cnr else None
            cnr = average.mean_std("cnr")
        else:
            fidelity = Fidelity.of_run(entry.first_fidelity)
            text_cnr = entry.text_source_cnr
            cnr = (average.mean_std("cnr")[0], None)
        out.append(
            Model(
                name=name,
                uncertainty=uncertainty,
                kind=_kind(entry),
                encoder=entry.setting.encoder,
                trainings=entry.trainings if isinstance(entry, TrainingGroup) else 1,
                source=entry.setting.prompt_source,
                base=entry.setting.base_model,
                cnr=cnr,
                auc=average.mean_std("auc_roc"),
                fidelity=fidelity,
                text_cnr=text_cnr,
            )
        )
    return out


def _average_mean(run: RunResult, metric: str) -> float | None:
    cell = run.grounding.average.measure(metric) if run.grounding.average else None
    return cell.mean if cell else None


def _uncertainty(records: ReportRecords, name: str, entry: RunResult | TrainingGroup) -> dict[str, Any]:
    """CNR's, AUC-ROC's and the first fidelity number's interval (Interval dicts): over trainings (t) for a group
    of two or more, else the run's bootstrap over phrases."""
    from cxrdiff.metrics.intervals import trainings_interval

    runs = records.runs
    members = list(entry.runs) if isinstance(entry, TrainingGroup) else [name]
    if len(members) >= 2:
        out = {}
        for m in ("cnr", "auc_roc"):
            values = [_average_mean(runs[r], m) for r in members]
            out[m] = trainings_interval([v for v in values if v is not None]).as_dict()
        first = next(iter(entry.fidelity or {}), None) if isinstance(entry, TrainingGroup) else None
        if first is not None:
            values = [f.value for r in members for f in runs[r].fidelity or () if f.name == first]
            out["fidelity"] = trainings_interval([v for v in values if v is not None]).as_dict()
        return out
    run = runs.get(members[0])
    if run is None:
        return {}
    out = dict(run.grounding.intervals.get("Average", {}))
    score = run.first_fidelity
    if score is not None and score.interval:
        out["fidelity"] = score.interval  # the one training's bootstrap over its generated images
    return out


def interval_text(interval: Mapping[str, Any] | None, digits: int = 2, scale: float = 1.0) -> str:
    """ " [low, high]" for an interval with bounds, " [too few (n)]" for one withheld for want of items (a class
    of fewer than 10 phrases), else "" (a value is never shown with a fake ± 0)."""
    if interval and str(interval.get("reason", "")).startswith("too few"):
        return f" [{interval['reason']}]"
    if not interval or interval.get("low") is None or interval.get("high") is None:
        return ""
    return f" [{interval['low'] * scale:.{digits}f}, {interval['high'] * scale:.{digits}f}]"


# --- the headline ----------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2, scale: float = 1.0) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}"


def _against(
    value: float | None, published: float | None, digits: int, scale: float = 1.0, interval: Any = None
) -> str:
    """'0.61 [0.52, 0.70] (paper 0.920, -0.31)': the measured value, its interval, the paper's, how far apart."""
    if value is None:
        return "not measured"
    text = _num(value, digits, scale) + interval_text(interval, digits, scale)
    if published is None:
        return text
    return f"{text} (paper {published:g}, {value * scale - published:+.{digits}f})"


def _fidelity_words(model: Model, paper: str | None) -> str:
    """The fidelity number and whether the paper has one to set beside it (FID_XRV: yes; FID: computed
    differently, so not comparable; any other feature distance: no published counterpart)."""
    f = model.fidelity
    if not f or f.value is None:
        return "fidelity not measured"
    spread = f" ± {f.std:.1f}" if f.std and (f.n or 1) > 1 else ""
    text = f"{f.title} {f.value:.1f}{spread}" + interval_text(f.interval, 1)
    published = PUBLISHED_FIDELITY.get(paper or "")
    if published and f.name == "FID_XRV" and not f.label:
        n = (f.protocol.get("n") or [None, None])[1]  # FD at n sits above FD at 5,000 by O(d/n)
        here = f"; here {n} images, the paper's 5,000" if n and n != 5000 else ""
        return f"{text} (paper {published[1]:g}, {f.value - published[1]:+.1f}{here})"
    if published and f.name == "FID" and not f.label:
        return f"{text} (paper {published[0]:g}, not comparable: computed differently)"
    return f"{text} (no published counterpart)"


def _other_text_line(model: Model) -> str:
    """A model trained on another text than impressions, set against the paper's Table 7: its CNR on the
    phrases that contain their label, the measure the paper gives for such models."""
    source = str(model.source)
    name = "synthetic impressions" if source.startswith("file:") else source_name(source)
    published = PUBLISHED_TEXT_SOURCE.get(name)
    paper = None if published is None else published[0 if model.kind == "learnable" else 1]
    if model.encoder:  # the paper's Table 7 is of SD2's own CLIP
        paper = None
    trainings = f", {model.trainings} trainings" if model.trainings > 1 else ""
    trained_on = literal(source_name(source))
    who = f"**{literal(model.name)}** (text encoder {_encoder_words(model)}, trained on {trained_on}{trainings}"
    who += "; the paper's Table 7)" if paper is not None else ")"
    return (
        f"{who}: CNR on the phrases that contain their label {_against(model.text_cnr, paper, 2)}; "
        f"average CNR {_num(model.cnr[0])}; AUC-ROC % {_num(model.auc[0], 1, 100)}; "
        + (_fidelity_words(model, None) if model.fidelity else "grounded only, as the paper measures it")
        + "."
    )


def _encoder_words(model: Model) -> str:
    """'frozen', or with another encoder than the base model's: 'tiny-bert, frozen'."""
    return f"{model.encoder}, {model.kind}" if model.encoder else str(model.kind)


def _model_line(model: Model) -> str:
    if model.source not in (None, "impression") and model.kind in ("frozen", "learnable"):
        return _other_text_line(model)
    paper = None if model.encoder else PUBLISHED_OF.get(model.kind)  # the paper's: SD2's own CLIP
    average = PUBLISHED_LOCALIZATION.get(paper or "", {}).get("Average")
    trainings = f", {model.trainings} trainings" if model.trainings > 1 else ""
    kind = model.kind if model.kind in ("base model", "fine-tuned") else f"text encoder {_encoder_words(model)}"
    if model.encoder and model.kind in ("base model", "fine-tuned"):
        kind += f", text encoder {model.encoder}"
    who = f"**{literal(model.name)}** ({kind}{trainings}"
    who += f"; the paper's {paper})" if paper else ")"
    u = model.uncertainty
    cnr = _against(model.cnr[0], average[2] if average else None, 2, interval=u.get("cnr"))
    auc = _against(model.auc[0], average[0] if average else None, 1, 100, interval=u.get("auc_roc"))
    return f"{who}: CNR {cnr}; AUC-ROC % {auc}; {_fidelity_words(model, paper)}."


SIDE_WORDS = {  # (what the paper found, the measure, which way is expected)
    "interpretability": ("the frozen text encoder's maps have the higher CNR", "CNR frozen − learnable"),
    "fidelity": ("the learnable text encoder's images are closer to the real ones", "learnable − frozen"),
}


def side_line(side: Mapping[str, Any]) -> str:
    """One half of the trade-off in words: the paper's finding, the two numbers, the difference with its
    interval and what it is over, and the verdict (`report.verdicts`: a verdict word only over 2+ trainings
    per model, and only when the interval excludes zero)."""
    from cxrdiff.metrics.intervals import Interval
    from cxrdiff.report.verdicts import evidence_words, power_words

    claim, measure = SIDE_WORDS[side["side"]]
    diff = Interval.from_dict(side["difference"])
    digits = 2 if side["side"] == "interpretability" else 1
    paper = (f"the paper: CNR {PUBLISHED_LOCALIZATION['Finetune_F']['Average'][2]:g} vs "
             f"{PUBLISHED_LOCALIZATION['Finetune_L']['Average'][2]:g}" if side["side"] == "interpretability" else
             f"the paper's FID: {PUBLISHED_FIDELITY['Finetune_L'][0]:g} vs {PUBLISHED_FIDELITY['Finetune_F'][0]:g} "
             f"on 5,000 images, lower is closer{_n_images(side)}")  # fmt: skip
    infinity = side.get("infinity")
    if infinity:
        paper += f"; bias-corrected FD∞ {infinity['frozen']:.1f} frozen vs {infinity['learnable']:.1f} learnable"
    power = "; " + power_words(side, digits) if side.get("power") else ""
    numbers = (f"{side['metric']} {side['frozen']:.{digits}f} frozen vs {side['learnable']:.{digits}f} learnable; "
               f"{measure} {diff.text(digits)}, {evidence_words(side)}{power}; {paper}")  # fmt: skip
    return f"{side['side'].capitalize()} (the paper: {claim}): **{side['verdict']}** ({numbers})."


def _n_images(side: Mapping[str, Any]) -> str:
    """How many images the distances here rest on (a distance at n sits above the one at 5,000 by O(d/n))."""
    n = side.get("images") or (None, None)
    if None in n:
        return ""
    return f"; here {n[0]} images frozen vs {n[1]} learnable" if n[0] != n[1] else f"; here {n[0]} images each"


def lora_lines(found: Sequence[Model], frozen: Model, learnable: Model) -> list[str]:
    """Where each LoRA model sits on the trade-off, beside the full fine-tunes (a third point: weights, and with a
    learnable text encoder the text encoder, that may move only a little)."""
    lines = []
    for m in found:
        if "LoRA" not in m.kind:
            continue
        cnr, f_cnr, l_cnr = m.cnr[0], frozen.cnr[0], learnable.cnr[0]
        text = f"LoRA, **{m.name}**: CNR {_num(cnr)} (full frozen {_num(f_cnr)}, full learnable {_num(l_cnr)})"
        fid, ff, lf = m.fidelity, frozen.fidelity, learnable.fidelity
        if fid and ff and lf and all(f.value is not None for f in (fid, ff, lf)) and fid.name == ff.name == lf.name:
            text += f"; {fid.title} {fid.value:.1f} (frozen {ff.value:.1f}, learnable {lf.value:.1f})"
        lines.append(text + ".")
    return lines


def verdict_lines(metrics: Mapping[str, Any] | ReportRecords) -> list[str]:
    """The trade-off's verdicts (metrics.json's `verdicts`): one block per base model when the runs were
    fine-tuned from several (e.g. the demo's pretrained and token-local text encoders)."""
    from cxrdiff.report.verdicts import trade_off_words

    records = read_metrics(metrics)
    found = records.verdicts
    if not found:
        kinds = sorted({m.kind for m in models(records)})
        return ["The trade-off needs one run with a frozen and one with a learnable text encoder fine-tuned from the "
                f"same base model; this report has {', '.join(kinds) or 'none'}."]  # fmt: skip
    lines = []
    for v in found:
        if len(found) > 1 or v.get("encoder"):  # several starts, or another encoder than the base model's CLIP
            names = f"{literal(v['frozen'])} vs {literal(v['learnable'])}"
            start = literal(Path(str(v["base"])).name)
            start += f" with text encoder {literal(v['encoder'])}" if v.get("encoder") else ""
            lines.append(f"**Fine-tuned from {start} ({names}):**")
        lines += [side_line(side) for side in v["sides"]]
        lines.append(trade_off_words(v))
        by_name = {m.name: m for m in models(records)}
        if v["frozen"] in by_name and v["learnable"] in by_name:
            lines += lora_lines(list(by_name.values()), by_name[v["frozen"]], by_name[v["learnable"]])
    return lines


def data_set_lines(metrics: Mapping[str, Any] | ReportRecords) -> list[str]:
    """Which data set the runs were measured on, and where its text came from (labels, impressions, notes)."""
    data = read_metrics(metrics).data_set
    if not data:
        return []
    rows = data.get("rows") or {}
    sizes = ", ".join(f"{rows[k]:,} {w}" for k, w in (("train", "train"), ("test", "test"), ("ms_cxr", "grounding"))
                      if isinstance(rows.get(k), int))  # fmt: skip
    text = data.get("text") or data.get("text_source", "—")
    grounding = f"; grounding: {data['grounding']}" if data.get("grounding") else ""
    return [
        f"**Data: {data.get('name', '—')}**" + (f" ({sizes} rows)" if sizes else "") + f"; text: {text}{grounding}."
    ]


def headline(metrics: Mapping[str, Any] | ReportRecords) -> tuple[list[str], Table]:
    """The report's first lines: per model CNR, AUC and fidelity against the paper's, the trade-off verdict;
    and the same numbers as one small table with the paper's rows."""
    records = read_metrics(metrics)
    found = models(records)
    lines = data_set_lines(records) + [_model_line(m) for m in found] + verdict_lines(records)
    rows = []
    for paper, (fid_value, fid_xrv, _) in PUBLISHED_FIDELITY.items():
        auc, _, cnr = PUBLISHED_LOCALIZATION[paper]["Average"]
        rows.append(
            [paper, "published (Tables 1, 4)", f"{cnr:g}", f"{auc:g}", f"FID {fid_value:g} / FID_XRV {fid_xrv:g}"]
        )
    for m in found:
        (cnr, std), u = m.cnr, m.uncertainty
        cell = _num(cnr) + (f" ± {std:.2f}" if std else "") + interval_text(u.get("cnr"))
        auc = _num(m.auc[0], 1, 100) + interval_text(u.get("auc_roc"), 1, 100)
        f = m.fidelity
        fidelity = "—"
        if f and f.value is not None:
            spread = f" ± {f.std:.1f}" if f.std and m.trainings > 1 else ""
            fidelity = f"{f.title} {f.value:.1f}{spread}{interval_text(f.interval, 1)}"
        rows.append([m.name, f"this report ({_encoder_words(m)})", cell, auc, fidelity])
    table = Table(
        "The trade-off in numbers: average CNR, AUC-ROC % and fidelity",
        ["model", "source", "CNR", "AUC-ROC %", "fidelity (lower is closer to real)"],
        rows,
        "± is the standard deviation over trainings when a setting has several; [ ] a 95% interval: over trainings "
        "(t) for two or more, else a bootstrap over the phrases (CNR, AUC-ROC) or the generated images (fidelity) "
        f"of the one training. Published: {PAPER}.",
    )
    return lines, table


# --- settings as small tables ------------------------------------------------------------------------


def _or_dash(value: Any) -> str:
    return "—" if value is None else str(value)


def settings_tables(metrics: Mapping[str, Any] | ReportRecords) -> list[Table]:
    """What was measured and how, as two small tables: the runs, and the sampling / grounding settings."""
    records = read_metrics(metrics)
    rows = []
    for name, r in records.runs.items():
        t, s = r.training, r.setting
        frozen = t.frozen_text
        encoder = s.text_encoder or ("—" if frozen is None else "frozen" if frozen else "learnable")
        rows.append(
            [
                name,
                _or_dash(r.kind),
                encoder + (f" + {s.training}" if s.lora else ""),  # LoRA
                s.encoder or ("CLIP (base model's)" if frozen is not None else "—"),
                str(s.trained or "—"),
                str(s.prompt_source or "—"),
                _or_dash(t.steps),
                _or_dash(t.lr),
                _or_dash(t.seed),
                Path(_or_dash(r.path)).name,
            ]
        )
    runs = Table(
        "Runs",
        [
            "run",
            "kind",
            "text encoder",
            "conditioning",
            "trained",
            "training text",
            "steps",
            "learning rate",
            "seed",
            "folder",
        ],  # fmt: skip
        rows,
        kind="settings",
    )
    c = records.settings
    keys = (
        ("sampler", "scheduler"),
        ("sampling steps", "sample_steps"),
        ("guidance", "guidance"),
        ("seed", "seed"),
        ("images for fidelity", "n_fid"),
        ("diversity prompts (× 4 images)", "diversity_prompts"),
        ("grounding steps", "ground_steps"),
        ("grounding window (last steps)", "ground_window"),
        ("grounded phrases (limit)", "ground_limit"),
        ("word analysis: more than N phrases", "min_word_count"),
        ("classifier positives", "classifier_positives"),
        ("classifier prompts per class", "classifier_prompts_per_class"),
    )
    measured = [[label, "—" if c.get(k) is None else str(c.get(k))] for label, k in keys if k in c]
    how = Table("How it was measured", ["setting", "value"], measured, kind="settings")
    return [t for t in (runs, how) if t.rows]


def conventions(metrics: Mapping[str, Any] | ReportRecords) -> list[str]:
    """The grounding conventions, named once for all runs (a run that differs is named with its own)."""
    runs = read_metrics(metrics).runs
    seen: dict[str, list[str]] = {}
    for name, r in runs.items():
        conv = r.grounding.conventions
        for key in ("cnr", "boxes_rule", "latent", "map", "frame_size", "mode", "guidance"):
            if key in conv:
                seen.setdefault(f"{key}: {conv[key]}", []).append(name)
    every = len(runs)
    return [f"Grounding {k}" + ("" if len(v) == every else f" (runs {', '.join(v)})") for k, v in seen.items()]


# --- the checkpoints' table ---------------------------------------------------------------------------


def checkpoint_table(metrics: Mapping[str, Any] | ReportRecords) -> Table | None:
    """The curves' numbers, with the paper's two end points (Finetune_F at 30k steps, Finetune_L at 60k)."""
    rows = []
    for paper, steps in PUBLISHED_STEPS.items():
        auc, _, cnr = PUBLISHED_LOCALIZATION[paper]["Average"]
        rows.append(
            [f"{paper} (published)", f"{steps:,}", f"{cnr:g}", f"{auc:g}", f"FID {PUBLISHED_FIDELITY[paper][0]:g}"]
        )
    for name, r in read_metrics(metrics).runs.items():
        for p in r.checkpoints:
            f = p.fidelity
            rows.append(
                [
                    name + (" (final model)" if p.source != "checkpoint" else ""),
                    f"{p.step:,}",
                    _num(p.cnr.mean if p.cnr else None),
                    _num(p.auc_roc.mean if p.auc_roc else None, 1, 100),
                    f"{f.name} {f.text(1)}" if f else "—",
                ]
            )
    if len(rows) == len(PUBLISHED_STEPS):
        return None
    return Table(
        "Over training: average CNR, AUC-ROC % and fidelity per kept checkpoint",
        ["model", "step", "CNR", "AUC-ROC %", "fidelity"],
        rows,
        f"Published: {PAPER}, Tables 1 and 4, at the end of training (their FID is not comparable, see Table 4's "
        "note). Measured with the same sampling and grounding settings as the runs.",
    )


# --- sections ----------------------------------------------------------------------------------------


def sections(tables: Sequence[Table], figures: Sequence[str]) -> list[tuple[str, list[str], list[Table]]]:
    """The page's sections in order: (heading, figures present, tables), each table in the first section
    whose prefixes its title starts with; any other table in a last 'Other measurements' section."""
    placed: set[int] = set()
    out = []
    for heading, figs, prefixes in SECTIONS:
        mine = [t for t in tables if id(t) not in placed and t.title.startswith(prefixes)]
        placed |= {id(t) for t in mine}
        present = [f for f in figs if f in figures]
        if mine or present:
            out.append((heading, present, mine))
    rest = [t for t in tables if id(t) not in placed]
    if rest:
        out.append(("Other measurements", [], rest))
    return out
