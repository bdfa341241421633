"""The page people read: the headline's numbers and verdict from hand-built metrics, settings as tables (no
JSON), each convention named once, figures in the sections of the tables they summarise."""

from __future__ import annotations

import pytest

from cxrdiff.data import MS_CXR_CATEGORIES
from cxrdiff.metrics.score import Score
from cxrdiff.report import page, render
from cxrdiff.report.render import Table, cnr_by_class_figure


def _run(frozen: bool | None, cnr: float, auc: float, fd: float, name: str = "FID_XRV") -> dict:
    average = {"cnr": {"mean": cnr, "std": 0.0}, "auc_roc": {"mean": auc, "std": 0.0}, "top1": {"mean": 0.5}}
    classes = {c: {"cnr": {"mean": cnr, "std": 0.05}} for c in MS_CXR_CATEGORIES}
    training = {} if frozen is None else {"frozen_text": frozen, "steps": 30, "lr": 5e-5, "seed": 0}
    conventions = {"cnr": "signed", "boxes_rule": "union of the class's boxes", "latent": "VAE posterior mean"}
    return {
        "kind": "finetune" if frozen is not None else "base model",
        "path": "/runs/x",
        "training": training,
        "grounding": {"average": average, "classes": classes, "conventions": conventions},
        "fidelity": [Score(name, fd).as_dict()],
    }


def _side(side: str, frozen: float, learnable: float, low: float, high: float, over: str = "trainings") -> dict:
    """One half of a verdict as report/verdicts.py writes it: over trainings the difference's interval decides
    (its p-value the normal one of that interval); over one training's phrases there is no verdict."""
    from scipy import stats

    from cxrdiff.metrics.intervals import Interval, verdict

    sign = 1 if side == "interpretability" else -1
    value = frozen - learnable if sign > 0 else learnable - frozen
    if over == "bootstrap":
        diff = Interval(value, low, high, method="bootstrap over phrases, paired, class-stratified, 1000 resamples, "
                        "percentile", n=50)  # fmt: skip
        return {"side": side, "metric": "CNR" if sign > 0 else "FID_XRV", "frozen": frozen, "learnable": learnable,
                "difference": diff.as_dict(), "expected_sign": sign, "over": over, "compared": ["frozen", "learnable"],
                "verdict": "no verdict (one training per model; a verdict needs 2+ trainings per model)"}  # fmt: skip
    diff = Interval(value, low, high, method="Welch t over trainings (2 vs 2)", n=(2, 2))
    p = float(2 * stats.norm.sf(abs(value) / ((high - low) / 3.92)))
    return {"side": side, "metric": "CNR" if sign > 0 else "FID_XRV", "frozen": frozen, "learnable": learnable,
            "difference": diff.as_dict(), "expected_sign": sign, "verdict": verdict(diff, sign),
            "over": over, "p_value": p, "spread": [0.1, 0.1]}  # fmt: skip


def _metrics(frozen_fd: float = 12.0, learnable_fd: float = 9.0, frozen_cnr: float = 0.61) -> dict:
    cnr_diff, fd_diff = frozen_cnr - 0.41, learnable_fd - frozen_fd
    return {
        "runs": {
            "frozen": _run(True, frozen_cnr, 0.81, frozen_fd),
            "learnable": _run(False, 0.41, 0.61, learnable_fd),
        },
        "settings": {"scheduler": "pndm", "sample_steps": 75, "guidance": 4.0, "n_fid": 5000, "ground_limit": None},
        "verdicts": [
            {
                "base": None,
                "frozen": "frozen",
                "learnable": "learnable",
                "trainings": [1, 1],
                "sides": [
                    _side("interpretability", frozen_cnr, 0.41, cnr_diff - 0.1, cnr_diff + 0.1),
                    _side("fidelity", frozen_fd, learnable_fd, fd_diff - 1.0, fd_diff + 1.0),
                ],
            }
        ],  # fmt: skip
    }


def test_headline_numbers_against_the_paper():
    lines, table = page.headline(_metrics())
    # Finetune_F: CNR 0.920, AUC 79, FID_XRV 10.1 (Tables 1 and 4); 0.61 - 0.92 = -0.31, 81.0 - 79 = +2.0
    assert lines[0] == (
        "**frozen** (text encoder frozen; the paper's Finetune_F): CNR 0.61 (paper 0.92, -0.31); "
        "AUC-ROC % 81.0 (paper 79, +2.0); FID_XRV 12.0 (paper 10.1, +1.9)."
    )
    # Finetune_L: 0.133, 54, 7.7: 0.41 - 0.133 = +0.28 (rounded), 61 - 54 = +7.0, 9.0 - 7.7 = +1.3
    assert lines[1].endswith(
        "CNR 0.41 (paper 0.133, +0.28); AUC-ROC % 61.0 (paper 54, +7.0); FID_XRV 9.0 (paper 7.7, +1.3)."
    )
    assert lines[-1] == (
        "**The trade-off (frozen: more interpretable, learnable: images closer to real) is reproduced here**: a half "
        "counts as reproduced or opposite only when its 95% interval over trainings excludes zero; a claim on one "
        "half alone passes Holm's correction over the halves shown."
    )
    assert lines[-3] == (
        "Interpretability (the paper: the frozen text encoder's maps have the higher CNR): **reproduced** "
        "(CNR 0.61 frozen vs 0.41 learnable; CNR frozen − learnable 0.20 [0.10, 0.30], over 2 vs 2 trainings "
        "(Welch's t); the paper: CNR 0.92 vs 0.133)."
    )
    assert lines[-2].endswith("the paper's FID: 61.9 vs 75.5 on 5,000 images, lower is closer).")
    assert [r[0] for r in table.rows] == ["SDv2", "Finetune_L", "Finetune_F", "frozen", "learnable"]
    assert table.rows[2][1:] == ["published (Tables 1, 4)", "0.92", "79", "FID 75.5 / FID_XRV 10.1"]


def test_one_training_per_model_gives_no_verdict_word_anywhere():
    """The same numbers from one training each: the interval over this training's phrases, and no verdict."""
    metrics = _metrics()
    metrics["verdicts"][0]["sides"] = [
        _side("interpretability", 0.61, 0.41, 0.10, 0.30, over="bootstrap"),
        _side("fidelity", 12.0, 9.0, -4.0, -2.0, over="bootstrap"),
    ]
    lines, _ = page.headline(metrics)
    said = " ".join(lines[2:]).lower()
    assert not any(word in said for word in ("reproduced", "opposite", "better")), said
    assert (
        "CNR frozen − learnable 0.20 [0.10, 0.30], 95% interval over this training's phrases (frozen and "
        "learnable; bootstrap, paired, class-stratified, 1000 resamples, percentile)" in lines[-3]
    )
    assert lines[-1].startswith(
        "**The trade-off (frozen: more interpretable, learnable: images closer to real): no "
        "verdict (one training per model; a verdict needs 2+ trainings per model).**"
    )


FID_SAID = "Fidelity (the paper: the learnable text encoder's images are closer to the real ones): "
CNR_SAID = "Interpretability (the paper: the frozen text encoder's maps have the higher CNR): "


@pytest.mark.parametrize(
    ("frozen_cnr", "frozen_fd", "verdict", "said"),
    [
        (0.61, 9.5, "partly reproduced (Holm over the halves shown)", FID_SAID + "**not distinguishable here**"),
        (0.61, 7.5, "mixed (one half reproduced, the other opposite)", FID_SAID + "**opposite**"),
        (0.25, 8.0, "partly opposite (Holm over the halves shown)", CNR_SAID + "**opposite**"),  # −0.16 ± 0.1
        (0.30, 12.0, "mixed (one half reproduced, the other opposite)", "**reproduced** (FID_XRV 12.0 frozen"),
        (
            0.45,
            9.5,
            "not distinguishable here",
            "**not distinguishable here** (CNR 0.45 frozen vs 0.41 learnable; "
            "CNR frozen − learnable 0.04 [-0.06, 0.14]",
        ),  # fmt: skip
    ],
)
def test_headline_verdict_per_side(frozen_cnr, frozen_fd, verdict, said):
    """A half is reproduced or opposite only when the difference's interval (here ± 0.1 CNR, ± 1 FD) excludes
    zero on that side; a difference inside it is not distinguishable, whatever its sign."""
    lines, _ = page.headline(_metrics(frozen_fd=frozen_fd, frozen_cnr=frozen_cnr))
    said = verdict if verdict.endswith((" here", ")")) else f"{verdict} here"  # never "here here"
    assert lines[-1].startswith(
        f"**The trade-off (frozen: more interpretable, learnable: images closer to real) is {said}**"
    )
    assert any(said in line for line in lines), lines


def test_a_verdict_over_trainings_says_so():
    metrics = _metrics()
    metrics["verdicts"][0]["sides"] = [_side("interpretability", 0.61, 0.41, 0.05, 0.35, over="trainings")]
    lines, _ = page.headline(metrics)
    assert "CNR frozen − learnable 0.20 [0.05, 0.35], over 2 vs 2 trainings (Welch's t);" in lines[-2]
    assert "is partly reproduced (Holm over the halves shown)**" in lines[-1]  # one half measured


def test_headline_fid_is_not_compared_and_a_lone_model_gets_no_verdict():
    metrics = {"runs": {"frozen": _run(True, 0.5, 0.7, 80.0, name="FID")}}
    lines, _ = page.headline(metrics)
    assert "FID 80.0 (paper 75.5, not comparable: computed differently)" in lines[0]
    assert lines[-1].startswith("The trade-off needs one run with a frozen and one with a learnable text encoder")
    assert "[" not in lines[0]  # no interval recorded: none printed (never a made-up ± 0)


def test_a_labels_model_is_set_against_the_papers_table_7():
    # the paper measures a labels-trained model by its CNR on the phrases that contain their label (Table 7:
    # frozen 0.80, learnable 0.29), not by Table 1's average, and it does not sample it
    metrics = _metrics()
    labels = _run(True, 0.26, 0.59, 0.0)
    del labels["fidelity"]
    labels.update(setting={"text_encoder": "frozen", "prompt_source": "labels"}, text_source={"cnr": 0.5})
    metrics["runs"]["frozen (labels)"] = labels
    lines, _ = page.headline(metrics)
    assert lines[2] == (
        "**frozen (labels)** (text encoder frozen, trained on class labels; the paper's Table 7): CNR on the "
        "phrases that contain their label 0.50 (paper 0.8, -0.30); average CNR 0.26; AUC-ROC % 59.0; grounded "
        "only, as the paper measures it."
    )
    assert "CNR 0.61 frozen vs 0.41 learnable" in " ".join(lines)  # the verdict sets the impression runs apart


def test_a_lora_model_is_its_own_kind_and_a_third_point_beside_the_full_fine_tunes():
    metrics = _metrics()
    lora = _run(False, 0.52, 0.70, 10.5)
    lora["setting"] = {"text_encoder": "learnable", "training": "LoRA r16", "prompt_source": "impression"}
    metrics["runs"]["learnable + LoRA r16"] = lora
    lines, table = page.headline(metrics)
    # no published counterpart: the paper trained every weight
    assert lines[2] == (
        "**learnable + LoRA r16** (text encoder learnable + LoRA r16): CNR 0.52; AUC-ROC % 70.0; "
        "FID_XRV 10.5 (no published counterpart)."
    )
    assert "CNR 0.61 frozen vs 0.41 learnable" in " ".join(lines)  # the verdict: the full fine-tunes only
    assert lines[-1] == (
        "LoRA, **learnable + LoRA r16**: CNR 0.52 (full frozen 0.61, full learnable 0.41); "
        "FID_XRV 10.5 (frozen 12.0, learnable 9.0)."
    )
    assert table.rows[-1][:2] == ["learnable + LoRA r16", "this report (learnable + LoRA r16)"]
    settings = next(t for t in page.settings_tables(metrics) if t.title == "Runs")
    assert settings.rows[-1][2] == "learnable + LoRA r16"


def test_headline_speaks_of_setting_groups_when_there_are_any():
    metrics = _metrics()
    metrics["groups"] = {
        "frozen-impression": {
            "trainings": 2,
            "setting": {"text_encoder": "frozen", "prompt_source": "impression"},
            "grounding": {"average": {"cnr": {"mean": 0.7, "std": 0.1, "n": 2}, "auc_roc": {"mean": 0.8, "n": 2}}},
            "fidelity": {"FID_XRV": {"mean": 11.0, "std": 1.0, "n": 2, "title": "FID_XRV", "label": ""}},
        }
    }
    metrics["groups"]["sd"] = {"trainings": 1, "setting": {"text_encoder": None}, "grounding": {}, "fidelity": {}}
    lines, table = page.headline(metrics)
    assert lines[0].startswith("**frozen-impression** (text encoder frozen, 2 trainings; the paper's Finetune_F)")
    assert (
        lines[1]
        == "**sd** (base model; the paper's SDv2): CNR not measured; AUC-ROC % not measured; fidelity not measured."
    )
    assert "FID_XRV 11.0 ± 1.0 (paper 10.1, +0.9)" in lines[0]  # ± over its 2 trainings
    assert table.rows[-2][:3] == ["frozen-impression", "this report (frozen)", "0.70 ± 0.10"]


def test_cnr_bars_say_which_variance_they_show():
    _, caption = cnr_by_class_figure(_metrics())
    assert "over grounding noise seeds" in caption
    metrics = _metrics()
    metrics["groups"] = {"g": {"trainings": 2, "grounding": {"classes": {"Edema": {"cnr": {"mean": 1.0, "std": 0.2}}}}}}
    _, caption = cnr_by_class_figure(metrics)
    assert "over trainings" in caption


def test_page_layout_settings_conventions_and_sections(tmp_path):
    metrics = _metrics()
    metrics["runs"]["frozen"]["checkpoints"] = [
        {
            "step": 10,
            "source": "checkpoint",
            "grounding": {"cnr": {"mean": 0.3}},
            "fidelity": Score("FID_XRV", 20.0).as_dict(),
        }
    ]
    render(metrics, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert md.index("## Headline") < md.index("![trade-off](trade-off.png)") < md.index("## Localization")
    local = md.split("\n## Localization on MS-CXR")[1].split("\n## ")[0]
    assert "![cnr-by-class](cnr-by-class.png)" in local and "### Localization on MS-CXR" in local
    over = md.split("\n## Over training (checkpoints)")[1].split("\n## ")[0]
    assert "![checkpoints](checkpoints.png)" in over
    assert "| Finetune_F (published) | 30,000 | 0.92 | 79 | FID 75.5 |" in over
    assert "| frozen | 10 | 0.30 | — | FID_XRV 20.0 |" in over
    settings = md.split("\n## Runs and settings")[1].split("\n## ")[0]
    assert "| frozen | finetune | frozen | CLIP (base model's) | — | — | 30 | 5e-05 | 0 | x |" in settings
    assert "| sampler | pndm |" in settings and "| grounded phrases (limit) | — |" in settings
    assert "{" not in settings  # no JSON dumps
    assert md.count("Grounding cnr: signed") == 1  # the convention of both runs, named once
    assert "&lt;EOS> (0.68)" in md and "<EOS>" not in md  # GitHub would drop a bare <EOS> as a tag
    for name in ("trade-off", "cnr-by-class", "checkpoints"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000


def test_a_table_no_section_claims_is_still_shown():
    tables = [Table("Localization X", ["a"], []), Table("Something new", ["b"], [])]
    placed = page.sections(tables, ["grounding"])
    assert [(h, f, [t.title for t in ts]) for h, f, ts in placed] == [
        ("Localization on MS-CXR (Tables 1 and 3)", ["grounding"], ["Localization X"]),
        ("Other measurements", [], ["Something new"]),
    ]


def test_a_verdict_per_base_model_when_runs_start_from_several():
    """The demo's --text-init both: one block of verdicts per base model."""
    metrics = _metrics()
    token = {"token-frozen": _run(True, 0.30, 0.70, 8.0), "token-learnable": _run(False, 0.90, 0.85, 11.0)}
    metrics["runs"].update(token)
    metrics["verdicts"][0]["base"] = "/demo/base-model-pretrained"
    metrics["verdicts"].append({"base": "/demo/base-model-token-local", "frozen": "token-frozen",
                                "learnable": "token-learnable", "trainings": [1, 1],
                                "sides": [_side("interpretability", 0.30, 0.90, -0.7, -0.5)]})  # fmt: skip
    lines, _ = page.headline(metrics)
    text = "\n".join(lines)
    pretrained, token_local = text.split("**Fine-tuned from base-model-token-local")
    assert "base-model-pretrained (frozen vs learnable)" in pretrained and "is reproduced here" in pretrained
    assert "(token-frozen vs token-learnable)" in token_local
    assert "CNR 0.30 frozen vs 0.90 learnable" in token_local and "is partly opposite (Holm" in token_local


def test_a_label_with_markup_shows_as_typed_in_both_pages(tmp_path):
    """A --label (or run name) like `<b>x</b>*y*` is text: report.md escapes it, report.html too, and the page's
    own **bold** around it still works."""
    metrics = _metrics()
    metrics["runs"] = {"<b>x</b>*y*" if n == "frozen" else n: r for n, r in metrics["runs"].items()}
    render(metrics, tmp_path)
    md = (tmp_path / "report.md").read_text()
    headline = md.split("## Headline")[1].split("\n## ")[0]
    assert "- **&lt;b>x&lt;/b>\\*y\\*** (text encoder frozen; the paper's Finetune_F): CNR 0.61" in headline
    assert "| &lt;b>x&lt;/b>\\*y\\* | this report (frozen) | 0.61 |" in headline  # the table below it
    assert "<b>" not in md and "*y*" not in md
    page_html = (tmp_path / "report.html").read_text()
    assert "<li><strong>&lt;b&gt;x&lt;/b&gt;*y*</strong> (text encoder frozen;" in page_html
    assert "<td>&lt;b&gt;x&lt;/b&gt;*y*</td>" in page_html and "<b>x" not in page_html
    from cxrdiff.report.document import literal, strong

    assert literal("[a](b) _c_ FID_XRV 0.6 [0.5, 0.7] &amp;") == "\\[a](b) \\_c\\_ FID_XRV 0.6 [0.5, 0.7] \\&amp;"
    assert strong(f"**{literal('**z**')}** said") == "<strong>**z**</strong> said"  # escaped stars make no bold


def test_a_groups_numbers_carry_their_t_interval_over_trainings():
    """Two trainings with FID_XRV 10 and 12: mean 11, std √2, t(0.975, 1) = 12.706 → 11 ± 12.7."""
    metrics = _metrics()
    metrics["runs"] = {"f0": _run(True, 0.6, 0.8, 10.0), "f1": _run(True, 0.7, 0.8, 12.0)}
    metrics["groups"] = {
        "F": {
            "runs": ["f0", "f1"],
            "trainings": 2,
            "setting": {"text_encoder": "frozen", "prompt_source": "impression"},
            "grounding": {"average": {"cnr": {"mean": 0.65, "std": 0.0707, "n": 2}, "auc_roc": {"mean": 0.8, "n": 2}}},
            "fidelity": {"FID_XRV": {"mean": 11.0, "std": 2**0.5, "n": 2, "title": "FID_XRV", "label": ""}},
        }
    }
    lines, _ = page.headline(metrics)
    assert "FID_XRV 11.0 ± 1.4 [-1.7, 23.7] (paper 10.1, +0.9)" in lines[0]
    assert "CNR 0.65 [0.01, 1.29]" in lines[0]  # 0.65 ± 12.706 × 0.05


def test_a_group_of_one_training_shows_its_runs_bootstrap_intervals():
    """The demo labels every model, so even one training is a group: its numbers carry the run's own bootstrap
    intervals (phrases for CNR, generated images for the distance), never a bare value."""
    from cxrdiff.metrics.intervals import Interval

    metrics = _metrics()
    run = metrics["runs"]["frozen"]
    run["fidelity"][0]["interval"] = Interval(12.0, 10.5, 13.5).as_dict()
    run["grounding_intervals"] = {"average": {"cnr": Interval(0.61, 0.5, 0.7).as_dict()}}
    metrics["groups"] = {
        "F": {
            "runs": ["frozen"],
            "trainings": 1,
            "setting": {"text_encoder": "frozen", "prompt_source": "impression"},
            "grounding": {"average": {"cnr": {"mean": 0.61, "std": 0.0, "n": 1}, "auc_roc": {"mean": 0.81, "n": 1}}},
            "fidelity": {"FID_XRV": {"mean": 12.0, "std": 0.0, "n": 1, "title": "FID_XRV", "label": ""}},
        }
    }
    lines, _ = page.headline(metrics)
    assert "CNR 0.61 [0.50, 0.70] (paper 0.92" in lines[0] and "FID_XRV 12.0 [10.5, 13.5] (paper 10.1" in lines[0]


def test_a_distance_set_beside_the_papers_says_on_how_many_images():
    metrics = _metrics()
    metrics["runs"]["frozen"]["fidelity"] = [Score("FID_XRV", 12.0, protocol={"n": [300, 200]}).as_dict()]
    lines, _ = page.headline(metrics)
    assert "FID_XRV 12.0 (paper 10.1, +1.9; here 200 images, the paper's 5,000)" in lines[0]
    assert "FID_XRV 9.0 (paper 7.7, +1.3)." in lines[1]  # n not recorded: nothing made up


def test_a_class_of_too_few_phrases_says_so_instead_of_an_interval():
    from cxrdiff.metrics.intervals import Interval

    few = Interval(0.4, None, None, method="bootstrap over phrases", n=7, reason="too few (7)").as_dict()
    assert page.interval_text(few) == " [too few (7)]"
    assert page.interval_text(Interval(0.4, 0.3, 0.5).as_dict()) == " [0.30, 0.50]"
    assert page.interval_text(Interval(0.4, None, None, reason="one training").as_dict()) == ""
