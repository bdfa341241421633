"""The report's view of metrics.json: typed records read once at the boundary (`read_metrics`), so the tables,
the headline and the figures ask a run or a group of trainings for its numbers instead of walking nested dicts.

A run is one training, measured; a group is the trainings of one setting, its numbers as mean ± std over them
(a group of one training is its run). A number that was not measured is None, never a default that reads as
a measurement. metrics.json itself stays the dict the measuring steps wrote: these records only read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from cxrdiff.metrics.score import Score

GROUND_METRICS = ("auc_roc", "top1", "cnr")
Interval = Mapping[str, Any]  # metrics.intervals.Interval.as_dict(): its bounds and how it was made


def read_dict(data: Any) -> Mapping[str, Any]:
    """An absent or null object of metrics.json read as an empty one."""
    return data if isinstance(data, Mapping) else {}


class FlatRecord:
    """A record that is one flat object of metrics.json, read field by field (an absent key: None)."""

    @classmethod
    def read(cls, data: Any) -> Self:
        d = read_dict(data)
        return cls(*(d.get(k) for k in cls.__dataclass_fields__))  # type: ignore[attr-defined,call-arg]


@dataclass(frozen=True)
class Measure:
    """One measured number: a run's {mean, std} (std over grounding noise seeds) or a group's {mean, std, n}
    over its trainings (`n`: how many trainings gave a value; None for a run's own number)."""

    mean: float | None
    std: float | None = None
    n: int | None = None

    @classmethod
    def read(cls, data: Any) -> Measure | None:
        return cls(data.get("mean"), data.get("std"), data.get("n")) if data else None


@dataclass(frozen=True)
class GroupScore(Measure):
    """A named score (a Fréchet distance) as mean ± std over a group's trainings, with its title and label."""

    name: str = ""
    title: str = ""
    label: str | None = None

    @classmethod
    def read_named(cls, name: str, data: Mapping[str, Any]) -> GroupScore:
        d = dict(data)
        return cls(d.get("mean"), d.get("std"), d.get("n"), name, d.get("title", name), d.get("label"))


@dataclass(frozen=True)
class Localization:
    """One class (or the class average) of a run or a group: AUC-ROC, Top-1 and CNR, and the phrases behind it."""

    auc_roc: Measure | None
    top1: Measure | None
    cnr: Measure | None
    n: int | None = None

    @classmethod
    def read(cls, data: Any) -> Localization | None:
        d = read_dict(data)
        return cls(*(Measure.read(d.get(m)) for m in GROUND_METRICS), d.get("n")) if data else None

    def measure(self, metric: str) -> Measure | None:
        return getattr(self, metric)

    def mean_std(self, metric: str) -> tuple[float | None, float | None]:
        """(mean, std) of one metric: a run's {mean, std} (std over noise seeds) or a group's {mean, std, n}
        (std over trainings, only with n > 1)."""
        cell = self.measure(metric)
        if not cell or cell.mean is None:
            return None, None
        std = cell.std if (2 if cell.n is None else cell.n) > 1 else None
        return float(cell.mean), (float(std) if std else None)


@dataclass(frozen=True)
class Word:
    word: str
    n: int
    cnr: float


@dataclass(frozen=True)
class WordAnalysis:
    """Table 6: per class the words with the highest mean CNR, the class's own words among the ranked, and the
    end-of-text token's CNR over all classes; `min_count` is None when the ground step recorded none."""

    min_count: int | None = None
    top3: Mapping[str, tuple[Word, ...]] = field(default_factory=dict)
    class_words: Mapping[str, tuple[Word, ...]] = field(default_factory=dict)
    eos_cnr: float | None = None

    @classmethod
    def read(cls, data: Any) -> WordAnalysis:
        d = read_dict(data)

        def words(by_class: Any) -> dict[str, tuple[Word, ...]]:
            return {c: tuple(Word(w["word"], w["n"], w["cnr"]) for w in ws) for c, ws in read_dict(by_class).items()}

        return cls(d.get("min_count"), words(d.get("top3")), words(d.get("class_words")), d.get("eos_cnr"))


@dataclass(frozen=True)
class Grounding:
    """Localization per class and on average, with each one's 95% intervals by metric (a run's bootstrap over
    phrases; a group has none of its own), the word analysis and the conventions it was measured with."""

    classes: Mapping[str, Localization | None] = field(default_factory=dict)  # None: the class has no phrases
    average: Localization | None = None
    intervals: Mapping[str, Mapping[str, Interval]] = field(default_factory=dict)  # by class, "Average" last
    words: WordAnalysis = field(default_factory=WordAnalysis)
    conventions: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, data: Any, intervals: Any = None) -> Grounding:
        d, iv = read_dict(data), read_dict(intervals)
        by_class = {c: read_dict(v) for c, v in read_dict(iv.get("classes")).items()}
        classes = {c: Localization.read(v) for c, v in read_dict(d.get("classes")).items()}
        return cls(
            classes,
            Localization.read(d.get("average")),
            {**by_class, "Average": read_dict(iv.get("average"))},
            WordAnalysis.read(d.get("word_analysis")),
            read_dict(d.get("conventions")),
        )

    @property
    def average_or_empty(self) -> Localization:
        """The class average, or one whose every metric is None where none was measured (a base model's table
        cells then read as unmeasured)."""
        return self.average or Localization(None, None, None)

    def at(self, category: str) -> Localization | None:
        """One class's localization, or the average's for "Average"."""
        return self.average if category == "Average" else self.classes.get(category)

    def interval(self, category: str, metric: str) -> Interval | None:
        return self.intervals.get(category, {}).get(metric)


@dataclass(frozen=True)
class Setting(FlatRecord):
    """What a run was trained as (the finetune manifest in words, `trainings.run_summary`); a group's is its
    runs' less the seed. All None for a base model."""

    text_encoder: str | None = None  # frozen / learnable
    encoder: str | None = None  # another encoder than the base model's own CLIP (`finetune --text-encoder`)
    trained: str | None = None
    training: str | None = None  # full, or e.g. "LoRA r16"
    prompt_source: str | None = None
    steps: int | None = None
    seed: int | None = None
    base_model: str | None = None

    @property
    def lora(self) -> bool:
        return self.training not in (None, "full")


@dataclass(frozen=True)
class Training(FlatRecord):
    """A run's recorded training config (empty for a base model)."""

    frozen_text: bool | None = None
    steps: int | None = None
    lr: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class CheckpointPoint:
    """One point of a run's curve over training (`report --checkpoints`)."""

    step: int
    source: str | None
    cnr: Measure | None
    auc_roc: Measure | None
    fidelity: Score | None

    @classmethod
    def read(cls, data: Mapping[str, Any]) -> CheckpointPoint:
        g, f = read_dict(data.get("grounding")), data.get("fidelity")
        fidelity = Score.from_dict(f) if f else None
        return cls(
            data["step"], data.get("source"), Measure.read(g.get("cnr")), Measure.read(g.get("auc_roc")), fidelity
        )


@dataclass(frozen=True)
class NetworkScores:
    """One feature network's scores of a benchmark (FD, KID, precision / recall / density / coverage), by name."""

    network: str
    scores: Mapping[str, Score]

    @classmethod
    def read(cls, data: Mapping[str, Any]) -> NetworkScores:
        return cls(data["network"], {s["name"]: Score.from_dict(dict(s)) for s in data.get("scores", [])})


@dataclass(frozen=True)
class ClassBenchmark:
    """One class's benchmark: its real and generated image counts, and its networks' scores (none: too few)."""

    n_real: int
    n_generated: int
    networks: tuple[NetworkScores, ...]


@dataclass(frozen=True)
class Benchmark:
    """A run's benchmark on feature networks (`report --features`): overall and per class."""

    networks: tuple[NetworkScores, ...]
    n: tuple[Any, Any]  # real test images, generated images
    per_class: Mapping[str, ClassBenchmark]
    min_class_images: int | None

    @classmethod
    def read(cls, data: Any) -> Benchmark | None:
        d = read_dict(data)
        if not d.get("networks"):
            return None
        per_class = {
            c: ClassBenchmark(
                e.get("n_real", 0),
                e.get("n_generated", 0),
                tuple(NetworkScores.read(n) for n in e.get("networks") or []),
            )
            for c, e in read_dict(d.get("per_class")).items()
        }
        n_real, n_fake = d.get("n", ["?", "?"])
        networks = tuple(NetworkScores.read(n) for n in d["networks"])
        return cls(networks, (n_real, n_fake), per_class, d.get("min_class_images"))


def _score(data: Any) -> Score | None:
    return Score.from_dict(dict(data)) if data else None


def _scores(data: Any) -> tuple[Score, ...]:
    return tuple(Score.from_dict(s) for s in data or [])


@dataclass(frozen=True)
class RunResult:
    """One run of metrics.json's `runs`. `fidelity` is None for a run that was grounded only (never sampled)."""

    name: str
    path: str | None
    kind: str | None  # fine-tuned / base model
    training: Training
    setting: Setting
    grounded: bool
    grounding: Grounding
    per_phrase: Grounding | None  # Table 3's scoring, None where it equals the union's
    fidelity: tuple[Score, ...] | None
    diversity: Score | None
    fidelity_ms_cxr: tuple[Score, ...]  # Table 4's second column: from the MS-CXR phrases
    diversity_ms_cxr: Score | None
    n_generated: int | None
    n_generated_ms_cxr: int | None
    classifier: Mapping[str, Score]
    checkpoints: tuple[CheckpointPoint, ...]
    benchmark: Benchmark | None  # None: not measured
    overlays: Mapping[str, list[str]]
    laterality: Mapping[str, Any]  # metrics.laterality's entry as measured (empty: metrics.json without laterality)
    text_source_cnr: float | None  # Table 7: CNR on the phrases that contain their label
    text_phrases: int | None
    eos_cnr: float | None  # the end-of-text token's CNR over all classes
    class_word_cnr: float | None
    raw: Mapping[str, Any]  # the entry as written, for the privacy section's readers

    @classmethod
    def read(cls, name: str, data: Mapping[str, Any]) -> RunResult:
        phrase = read_dict(data.get("grounding_per_phrase")) or {"same_as_union": True}
        text, eos = read_dict(data.get("text_source")), read_dict(data.get("eos"))
        per_phrase = None if phrase.get("same_as_union") else Grounding.read(phrase, phrase.get("intervals"))
        return cls(
            name=name,
            path=data.get("path"),
            kind=data.get("kind"),
            training=Training.read(data.get("training")),
            setting=Setting.read(data.get("setting")),
            grounded=bool(data.get("grounding")),
            grounding=Grounding.read(data.get("grounding"), data.get("grounding_intervals")),
            per_phrase=per_phrase,
            fidelity=_scores(data["fidelity"]) if "fidelity" in data else None,
            diversity=_score(data.get("diversity")),
            fidelity_ms_cxr=_scores(data.get("fidelity_ms_cxr")),
            diversity_ms_cxr=_score(data.get("diversity_ms_cxr")),
            n_generated=data.get("n_generated"),
            n_generated_ms_cxr=data.get("n_generated_ms_cxr"),
            classifier={c: Score.from_dict(s) for c, s in read_dict(data.get("classifier")).items() if s},
            checkpoints=tuple(CheckpointPoint.read(p) for p in data.get("checkpoints") or []),
            benchmark=Benchmark.read(data.get("benchmark")),
            overlays=read_dict(data.get("overlays")),
            laterality=read_dict(data.get("laterality")),
            text_source_cnr=text.get("cnr"),
            text_phrases=text.get("n"),
            eos_cnr=eos.get("eos_cnr"),
            class_word_cnr=eos.get("class_word_cnr"),
            raw=data,
        )

    @property
    def first_fidelity(self) -> Score | None:
        """The run's first fidelity score: the one the trade-off draws."""
        return (self.fidelity or (None,))[0]


@dataclass(frozen=True)
class TrainingGroup:
    """One setting's trainings (metrics.json's `groups`): each number as mean ± std over them."""

    name: str
    runs: tuple[str, ...]
    trainings: int
    setting: Setting
    grounding: Grounding
    noise_cnr: float | None  # the mean over trainings of the average CNR's std over grounding noise seeds
    fidelity: Mapping[str, GroupScore]
    fidelity_ms_cxr: Mapping[str, GroupScore]
    diversity: Measure | None
    diversity_ms_cxr: Measure | None
    n_generated: int | None
    n_generated_ms_cxr: int | None
    text_source: str | None
    text_cnr: Measure | None  # Table 7: CNR on the phrases that contain their label
    text_phrases: int | None
    eos_cnr: Measure | None
    class_word_cnr: Measure | None

    @classmethod
    def read(cls, name: str, data: Mapping[str, Any]) -> TrainingGroup:
        text, eos = read_dict(data.get("text_source")), read_dict(data.get("eos"))
        noise = read_dict(read_dict(data.get("noise_seed_std")).get("average")).get("cnr")

        def named(key: str) -> dict[str, GroupScore]:
            return {n: GroupScore.read_named(n, s) for n, s in read_dict(data.get(key)).items()}

        return cls(
            name=name,
            runs=tuple(data.get("runs", [name])),
            trainings=data.get("trainings", 1),
            setting=Setting.read(data.get("setting")),
            grounding=Grounding.read(data.get("grounding")),
            noise_cnr=noise,
            fidelity=named("fidelity"),
            fidelity_ms_cxr=named("fidelity_ms_cxr"),
            diversity=Measure.read(data.get("diversity")),
            diversity_ms_cxr=Measure.read(data.get("diversity_ms_cxr")),
            n_generated=data.get("n_generated"),
            n_generated_ms_cxr=data.get("n_generated_ms_cxr"),
            text_source=text.get("source"),
            text_cnr=Measure.read(text.get("cnr")),
            text_phrases=text.get("phrases"),
            eos_cnr=Measure.read(eos.get("eos_cnr")),
            class_word_cnr=Measure.read(eos.get("class_word_cnr")),
        )

    @property
    def first_fidelity(self) -> GroupScore | None:
        return next(iter(self.fidelity.values()), None)


@dataclass(frozen=True)
class ReportRecords:
    """metrics.json as the report reads it: the runs, the setting groups and what applies to all of them."""

    runs: Mapping[str, RunResult]
    groups: Mapping[str, TrainingGroup]
    settings: Mapping[str, Any]  # the report's own config (flat)
    ddof: int
    classifier: str | None
    real_classifier: Mapping[str, Score]
    verdicts: tuple[Mapping[str, Any], ...]  # report.verdicts' records, as written
    untrained: bool  # some score came from randomly initialised features
    data_set: Mapping[str, Any]  # the data set measured on and its text, as the report recorded it
    metrics: Mapping[str, Any]  # the dict read, for the readers that take it whole (privacy)


def read_metrics(metrics: Mapping[str, Any] | ReportRecords) -> ReportRecords:
    """The report's records from the metrics dict (metrics.json); records pass through unchanged, so a table
    or figure may be given either."""
    if isinstance(metrics, ReportRecords):
        return metrics
    import json

    from cxrdiff.metrics.score import UNTRAINED_LABEL

    real = read_dict(read_dict(metrics.get("real")).get("classifier"))
    return ReportRecords(
        runs={n: RunResult.read(n, r) for n, r in read_dict(metrics.get("runs")).items()},
        groups={g: TrainingGroup.read(g, v) for g, v in read_dict(metrics.get("groups")).items()},
        settings=read_dict(metrics.get("settings")),
        ddof=read_dict(metrics.get("trainings")).get("ddof", 1),
        classifier=metrics.get("classifier"),
        real_classifier={c: Score.from_dict(s) for c, s in real.items() if s},
        verdicts=tuple(metrics.get("verdicts") or ()),
        untrained=UNTRAINED_LABEL in json.dumps(metrics, default=str),
        data_set=read_dict(metrics.get("data_set")),
        metrics=metrics,
    )
