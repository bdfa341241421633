"""The classifier check's own prompt set (`--classifier-prompts-per-class K`): K prompts per class d and K
"No Finding" prompts, drawn from the held-out p19 test rows that count for d (by --classifier-positives), so that
each class of Table 5 rests on K generated images whatever the test set's label mix. Without it the check runs on
the p19 samples, and a class rests on as many images as the test set holds for it (in the demo's 72 p19 images:
1 to 5 per class whose only label is d).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxrdiff.artifacts import MANIFEST, atomic_path, input_identity, settings_key, write_manifest
from cxrdiff.data import LABELS, MS_CXR_CATEGORIES
from cxrdiff.report.config import ReportConfig, Steps
from cxrdiff.report.measure import classifier_on_images, label_groups
from cxrdiff.report.steps import cached, image_size, read_table, run_step

NO_FINDING = "No Finding"
CLASSES: tuple[str, ...] = (*MS_CXR_CATEGORIES, NO_FINDING)
FOLDER = "classifier-prompts"  # in the report folder
TABLE = "prompts.parquet"
SAMPLES = "samples-classifier"  # in each run's folder
PROMPT_COLUMN = "impression"
KEPT = (PROMPT_COLUMN, "dicom_id", "subject_id", "study_id", *LABELS)


def balanced_prompts(test: Any, per_class: int, rule: str = "only", seed: int = 0) -> Any:
    """`per_class` rows of `test` for each class of `CLASSES` that has any: the rows that count for it (by `rule`,
    as `measure.label_groups`) in a seeded order, from the start again when there are fewer (a repeated prompt
    still makes another image: each prompt index has its own sampling seed). A class with no row is left out.
    Columns: `classifier_class`, `source_row` (the row of `test`), then the prompt, ids and labels."""
    import pandas as pd

    by_class, no_finding = label_groups(test, list(range(len(test))), rule)
    candidates = {**by_class, NO_FINDING: no_finding}
    picked: list[int] = []
    classes: list[str] = []
    for index, cls in enumerate(CLASSES):
        rows = candidates.get(cls, [])
        if not rows:
            continue
        order = np.random.default_rng([seed, index]).permutation(rows)  # one stream per class
        picked += [int(order[i % len(order)]) for i in range(per_class)]
        classes += [cls] * per_class
    kept = [c for c in KEPT if c in test]
    table = test.iloc[picked][kept].reset_index(drop=True) if picked else pd.DataFrame(columns=kept)
    table.insert(0, "source_row", picked)
    table.insert(0, "classifier_class", classes)
    return table


def write_classifier_prompts(config: ReportConfig, real: Path) -> Path:
    """The balanced prompt set from `real`/test.parquet, in a folder of its own in the report folder with a
    manifest written last (its hash is the set's identity for the sample step); an equal set already there is
    kept as it is, so the sample folders made from it stay valid."""
    settings = {"per_class": config.classifier_prompts_per_class, "rule": config.classifier_positives}
    table = balanced_prompts(read_table(real / "test.parquet"), **settings, seed=config.seed)
    path = prompts_path(config)
    if (path.parent / MANIFEST).is_file() and path.is_file() and read_table(path).equals(table):
        return path
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    write_manifest(path.parent, "classifier-prompts", config=settings, inputs={"real": real}, seed=config.seed)
    return path


def prompts_path(config: ReportConfig) -> Path:
    return Path(config.out) / FOLDER / TABLE


def measure_classifier_set(
    config: ReportConfig, run: Path, folder: Path, steps: Steps, classifier: Any, metric: dict, done: list[str]
) -> dict[str, Any]:
    """The run's images of the balanced prompt set (made or reused, as the p19 samples: sampler, steps, seed
    rule) and the classifier check on them, cached in metrics-classifier.json under the key of the metric settings
    and the folder's identity. {"classifier": AUC per class} ({} without No-Finding prompts)."""
    prompts = prompts_path(config)
    if read_table(prompts).empty:  # the test set labels no class and no No Finding: nothing to check
        return {}
    sample_fn, sample_config = steps["sample"]
    common = dict(model=run, steps=config.sample_steps, guidance=config.guidance, scheduler=config.scheduler)
    common.update(seed=config.seed, batch_size=config.batch_size, prompts=prompts, n_per_prompt=1, limit=None)
    samples = run_step(SAMPLES, sample_fn, sample_config(out=folder / SAMPLES, **common), done)
    key = settings_key({**metric, "samples": input_identity(samples)})

    def measure() -> dict[str, Any]:
        table = read_table(samples / "samples.parquet")
        paths = [samples / f for f in table["file"]]
        return classifier_on_images(config, table, paths, image_size(paths[0]), classifier) if paths else {}

    measured, fresh = cached(folder / "metrics-classifier.json", key, measure)
    if fresh:
        done.append("metrics-classifier")
    return measured
