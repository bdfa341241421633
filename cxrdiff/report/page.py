"""The report as people read it: a headline in plain words, sections that put each figure beside the tables
it summarises, the run settings as small tables and every convention named once.

`render.py` builds the paper's tables and the figures; this module decides what is said first and where
each piece goes. Pure functions of the metrics dict, like the rest of the rendering.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cxrdiff.metrics.score import Score
from cxrdiff.report.document import Table
from cxrdiff.report.published import PAPER, PUBLISHED_FIDELITY, PUBLISHED_LOCALIZATION, PUBLISHED_TEXT_SOURCE
from cxrdiff.report.text_source import source_name

PUBLISHED_OF = {"frozen": "Finetune_F", "learnable": "Finetune_L", "base model": "SDv2"}
PUBLISHED_STEPS = {"Finetune_F": 30_000, "Finetune_L": 60_000}  # the paper's training lengths

# Each section: its heading, its figures (file stems) and the tables it holds (title prefixes), in page order.
# A table no section claims lands in the last, "Other measurements".
SECTIONS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("Localization on MS-CXR (Tables 1 and 3)", ("cnr-by-class", "grounding"), ("Localization", "CNR against")),
    ("Fidelity and diversity (Tables 4 and 5)", (), ("Fidelity", "Classifier")),
    ("Privacy: does the model copy its training images?", ("privacy-pairs", "privacy-over-training"), ("Privacy",)),
    ("Over training (checkpoints)", ("checkpoints",), ("Over training",)),
    ("Words (Table 6) and the end-of-text token", (), ("Word analysis", "EOS")),
    ("Training text (Table 7)", (), ("CNR by training text",)),
)
CAPTIONS = {
    "trade-off": "CNR (interpretability) against fidelity (lower is closer to real images): left the paper's three "
    "models (Tables 1 and 4), right every run (small) and setting group (large, ± over trainings) of this report; "
    "dotted lines mark the paper's average CNR of Finetune_F and Finetune_L.",
    "grounding": "One overlay per class (columns) for each run (rows): the class words' cross-attention map over the "
    "image, MS-CXR boxes drawn.",
    "checkpoints": "Average CNR and fidelity of each run's kept checkpoints against training steps, frozen and "
    "learnable on one figure (the newest point of each run is the run's own model).",
}


# --- the models the headline speaks of -------------------------------------------------------------


def _kind(entry: Mapping[str, Any], group: bool) -> str:
    """frozen / learnable / base model, from a group's setting or a run's training record (a group records
    no text encoder only for base models)."""
    encoder = (entry.get("setting") or {}).get("text_encoder")
    if encoder:
        return str(encoder)
    frozen = (entry.get("training") or {}).get("frozen_text")
    if frozen is not None:
        return "frozen" if frozen else "learnable"
    return "base model" if group or entry.get("kind") == "base model" else "fine-tuned"


def _value(cell: Any) -> tuple[float | None, float | None]:
    """(mean, std) of a measured cell: a run's {mean, std} (std over noise seeds) or a group's {mean, std, n}
    (std over trainings, only with n > 1)."""
    if not cell or cell.get("mean") is None:
        return None, None
    std = cell.get("std") if cell.get("n", 2) > 1 else None
    return float(cell["mean"]), (float(std) if std else None)


def models(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each model the report measured, as the headline needs it: setting groups when there are any (means over
    trainings), else the runs. Fidelity is the first measure of the run (the one drawn in the trade-off)."""
    groups = metrics.get("groups") or {}
    out = []
    for name, entry in (groups or metrics.get("runs", {})).items():
        average = (entry.get("grounding") or {}).get("average") or {}
        if groups:
            first = next(iter((entry.get("fidelity") or {}).items()), None)
            fidelity = None if first is None else {"name": first[0], **first[1], "value": first[1].get("mean")}
            trainings = entry.get("trainings", 1)
            source = (entry.get("setting") or {}).get("prompt_source")
            text_cnr = ((entry.get("text_source") or {}).get("cnr") or {}).get("mean")
        else:
            fidelity = (entry.get("fidelity") or [None])[0]
            fidelity = None if fidelity is None else {**fidelity, "title": Score.from_dict(fidelity).title}
            trainings = 1
            source = (entry.get("setting") or {}).get("prompt_source")
            text_cnr = (entry.get("text_source") or {}).get("cnr")
        out.append(
            {
                "name": name,
                "kind": _kind(entry, bool(groups)),
                "trainings": trainings,
                "source": source,
                "base": (entry.get("setting") or {}).get("base_model"),
                "cnr": _value(average.get("cnr")) if groups else (_value(average.get("cnr"))[0], None),
                "auc": _value(average.get("auc_roc")),
                "fidelity": fidelity,
                "text_cnr": text_cnr,  # Table 7: CNR on the phrases that contain their label
            }
        )
    return out


# --- the headline ----------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2, scale: float = 1.0) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}"


def _against(value: float | None, published: float | None, digits: int, scale: float = 1.0) -> str:
    """'0.61 (paper 0.920, -0.31)': the measured value, the paper's and how far apart."""
    if value is None:
        return "not measured"
    if published is None:
        return _num(value, digits, scale)
    return f"{_num(value, digits, scale)} (paper {published:g}, {value * scale - published:+.{digits}f})"


def _fidelity_words(model: Mapping[str, Any], paper: str | None) -> str:
    """The fidelity number and whether the paper has one to set beside it (FID_XRV: yes; FID: computed
    differently, so not comparable; any other feature distance: no published counterpart)."""
    f = model.get("fidelity")
    if not f or f.get("value") is None:
        return "fidelity not measured"
    text = f"{f.get('title', f['name'])} {f['value']:.1f}"
    published = PUBLISHED_FIDELITY.get(paper or "")
    if published and f["name"] == "FID_XRV" and not f.get("label"):
        return f"{text} (paper {published[1]:g}, {f['value'] - published[1]:+.1f})"
    if published and f["name"] == "FID" and not f.get("label"):
        return f"{text} (paper {published[0]:g}, not comparable: computed differently)"
    return f"{text} (no published counterpart)"


def _other_text_line(model: Mapping[str, Any]) -> str:
    """A model trained on another text than impressions, set against the paper's Table 7: its CNR on the
    phrases that contain their label, the measure the paper gives for such models."""
    source = model["source"]
    name = "synthetic impressions" if source.startswith("file:") else source_name(source)
    published = PUBLISHED_TEXT_SOURCE.get(name)
    paper = None if published is None else published[0 if model["kind"] == "learnable" else 1]
    trainings = f", {model['trainings']} trainings" if model["trainings"] > 1 else ""
    who = f"**{model['name']}** (text encoder {model['kind']}, trained on {source_name(source)}{trainings}"
    who += "; the paper's Table 7)" if paper is not None else ")"
    return (
        f"{who}: CNR on the phrases that contain their label {_against(model.get('text_cnr'), paper, 2)}; "
        f"average CNR {_num(model['cnr'][0])}; AUC-ROC % {_num(model['auc'][0], 1, 100)}; "
        + (_fidelity_words(model, None) if model.get("fidelity") else "grounded only, as the paper measures it")
        + "."
    )


def _model_line(model: Mapping[str, Any]) -> str:
    if model.get("source") not in (None, "impression") and model["kind"] in ("frozen", "learnable"):
        return _other_text_line(model)
    paper = PUBLISHED_OF.get(model["kind"])
    average = PUBLISHED_LOCALIZATION.get(paper or "", {}).get("Average")
    trainings = f", {model['trainings']} trainings" if model["trainings"] > 1 else ""
    kind = model["kind"] if model["kind"] in ("base model", "fine-tuned") else f"text encoder {model['kind']}"
    who = f"**{model['name']}** ({kind}{trainings}"
    who += f"; the paper's {paper})" if paper else ")"
    cnr = _against(model["cnr"][0], average[2] if average else None, 2)
    auc = _against(model["auc"][0], average[0] if average else None, 1, 100)
    return f"{who}: CNR {cnr}; AUC-ROC % {auc}; {_fidelity_words(model, paper)}."


def _pick(found: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    """The model of a kind the trade-off is judged on: the one trained on impressions, as the paper's."""
    of_kind = [m for m in found if m["kind"] == kind]
    return next((m for m in of_kind if m.get("source") in (None, "impression")), of_kind[0] if of_kind else None)


def tradeoff_verdict(found: Sequence[Mapping[str, Any]]) -> list[str]:
    """The direction of the trade-off in words: frozen grounds better (higher CNR), learnable makes images
    closer to real ones (lower distance), as in the paper; each side reproduced or not."""
    frozen, learnable = _pick(found, "frozen"), _pick(found, "learnable")
    if frozen is None or learnable is None:
        return ["The trade-off needs one run with a frozen and one with a learnable text encoder; this report has "
                + (", ".join(sorted({m["kind"] for m in found})) or "none") + "."]  # fmt: skip
    lines, sides = [], []
    f_cnr, l_cnr = frozen["cnr"][0], learnable["cnr"][0]
    paper_f, paper_l = (PUBLISHED_LOCALIZATION[m]["Average"][2] for m in ("Finetune_F", "Finetune_L"))
    if f_cnr is not None and l_cnr is not None:
        ok = f_cnr > l_cnr
        sides.append(ok)
        lines.append(
            f"Interpretability: the frozen text encoder {'grounds better' if ok else 'does not ground better'} than "
            f"the learnable one (CNR {f_cnr:.2f} vs {l_cnr:.2f}; the paper: {paper_f:g} vs {paper_l:g}): "
            f"{'reproduced' if ok else 'not reproduced'}."
        )
    ff, lf = frozen.get("fidelity"), learnable.get("fidelity")
    if ff and lf and ff.get("value") is not None and lf.get("value") is not None and ff["name"] == lf["name"]:
        ok = lf["value"] < ff["value"]
        sides.append(ok)
        untrained = " (from an untrained network: not evidence either way)" if ff.get("label") else ""
        lines.append(
            f"Fidelity: the learnable text encoder's images are {'closer to' if ok else 'not closer to'} the real "
            f"ones ({ff.get('title', ff['name'])} {lf['value']:.1f} vs {ff['value']:.1f}, lower is closer; the "
            f"paper's FID: {PUBLISHED_FIDELITY['Finetune_L'][0]:g} vs {PUBLISHED_FIDELITY['Finetune_F'][0]:g})"
            f"{untrained}: {'reproduced' if ok else 'not reproduced'}."
        )
    verdict = "reproduced" if sides and all(sides) else "partly reproduced" if any(sides) else "not reproduced"
    lines.append(f"**The trade-off (frozen: more interpretable, learnable: images closer to real) is {verdict} here.**")
    return lines


def verdicts(found: Sequence[Mapping[str, Any]]) -> list[str]:
    """The trade-off verdict; one per base model when the runs were fine-tuned from several (e.g. the demo's
    pretrained and token-local text encoders), frozen set against learnable of the same start only."""
    bases = list(dict.fromkeys(m["base"] for m in found if m.get("base") and m["kind"] in ("frozen", "learnable")))
    if len(bases) < 2:
        return tradeoff_verdict(found)
    lines = []
    for base in bases:
        same = [m for m in found if m.get("base") == base]
        lines.append(f"**Fine-tuned from {Path(base).name} ({', '.join(m['name'] for m in same)}):**")
        lines += tradeoff_verdict(same)
    return lines


def headline(metrics: Mapping[str, Any]) -> tuple[list[str], Table]:
    """The report's first lines: per model CNR, AUC and fidelity against the paper's, the trade-off verdict;
    and the same numbers as one small table with the paper's rows."""
    found = models(metrics)
    lines = [_model_line(m) for m in found] + verdicts(found)
    rows = []
    for paper, (fid_value, fid_xrv, _) in PUBLISHED_FIDELITY.items():
        auc, _, cnr = PUBLISHED_LOCALIZATION[paper]["Average"]
        rows.append(
            [paper, "published (Tables 1, 4)", f"{cnr:g}", f"{auc:g}", f"FID {fid_value:g} / FID_XRV {fid_xrv:g}"]
        )
    for m in found:
        cnr, std = m["cnr"]
        cell = _num(cnr) + (f" ± {std:.2f}" if std else "")
        f = m.get("fidelity")
        fidelity = f"{f.get('title', f['name'])} {f['value']:.1f}" if f and f.get("value") is not None else "—"
        rows.append([m["name"], f"this report ({m['kind']})", cell, _num(m["auc"][0], 1, 100), fidelity])
    table = Table(
        "The trade-off in numbers: average CNR, AUC-ROC % and fidelity",
        ["model", "source", "CNR", "AUC-ROC %", "fidelity (lower is closer to real)"],
        rows,
        "± over trainings when a setting has several. " + f"Published: {PAPER}.",
    )
    return lines, table


# --- settings as small tables ------------------------------------------------------------------------


def settings_tables(metrics: Mapping[str, Any]) -> list[Table]:
    """What was measured and how, as two small tables: the runs, and the sampling / grounding settings."""
    rows = []
    for name, r in metrics.get("runs", {}).items():
        t = r.get("training") or {}
        s = r.get("setting") or {}
        frozen = t.get("frozen_text")
        encoder = s.get("text_encoder") or ("—" if frozen is None else "frozen" if frozen else "learnable")
        rows.append(
            [
                name,
                str(r.get("kind", "—")),
                encoder,
                str(s.get("prompt_source") or "—"),
                str(t.get("steps") if t.get("steps") is not None else "—"),
                str(t.get("lr") if t.get("lr") is not None else "—"),
                str(t.get("seed") if t.get("seed") is not None else "—"),
                Path(str(r.get("path", "—"))).name,
            ]
        )
    runs = Table(
        "Runs",
        ["run", "kind", "text encoder", "training text", "steps", "learning rate", "seed", "folder"],
        rows,
        kind="settings",
    )
    c = metrics.get("settings") or {}
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
    )
    measured = [[label, "—" if c.get(k) is None else str(c.get(k))] for label, k in keys if k in c]
    how = Table("How it was measured", ["setting", "value"], measured, kind="settings")
    return [t for t in (runs, how) if t.rows]


def conventions(metrics: Mapping[str, Any]) -> list[str]:
    """The grounding conventions, named once for all runs (a run that differs is named with its own)."""
    seen: dict[str, list[str]] = {}
    for name, r in metrics.get("runs", {}).items():
        conv = (r.get("grounding") or {}).get("conventions") or {}
        for key in ("cnr", "boxes_rule", "latent", "map", "frame_size", "mode", "guidance"):
            if key in conv:
                seen.setdefault(f"{key}: {conv[key]}", []).append(name)
    every = len(metrics.get("runs", {}))
    return [f"Grounding {k}" + ("" if len(v) == every else f" (runs {', '.join(v)})") for k, v in seen.items()]


# --- the checkpoints' table ---------------------------------------------------------------------------


def checkpoint_table(metrics: Mapping[str, Any]) -> Table | None:
    """The curves' numbers, with the paper's two end points (Finetune_F at 30k steps, Finetune_L at 60k)."""
    rows = []
    for paper, steps in PUBLISHED_STEPS.items():
        auc, _, cnr = PUBLISHED_LOCALIZATION[paper]["Average"]
        rows.append(
            [f"{paper} (published)", f"{steps:,}", f"{cnr:g}", f"{auc:g}", f"FID {PUBLISHED_FIDELITY[paper][0]:g}"]
        )
    for name, r in metrics.get("runs", {}).items():
        for p in r.get("checkpoints") or []:
            g = p.get("grounding") or {}
            f = p.get("fidelity")
            rows.append(
                [
                    name + (" (final model)" if p.get("source") != "checkpoint" else ""),
                    f"{p['step']:,}",
                    _num((g.get("cnr") or {}).get("mean")),
                    _num((g.get("auc_roc") or {}).get("mean"), 1, 100),
                    f"{f['name']} {Score.from_dict(f).text(1)}" if f else "—",
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
