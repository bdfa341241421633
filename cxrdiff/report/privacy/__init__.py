"""Does the model reproduce its training patients' images? The report's privacy section, per run.

For every generated image of a run (the p19 samples), its nearest training image over the prepared folder's
training set (the train shards' `image_path`, read at the generated size): by cosine similarity of features on
one network (`--privacy-features`, default the first `--features` network) and by Pearson correlation of the
pixels (`--privacy-pixels` px). What counts as a copy is calibrated on the real held-out test images (p19
patients, never trained on): the threshold is the split-conformal `--privacy-quantile` of their nearest-training
similarities (`metrics.privacy.copy_threshold`), and the copy rate is the share of generated images above it,
with a Wilson interval. A model that copies nothing lands near the nominal 1 − quantile (5 %); whether a run copies
more is the exact one-sided test `metrics.privacy.copy_count_test` (calibration noise included), and whether its
similarities follow the held-out images' law a two-sample KS test. The run's entry of metrics.json holds it under
"privacy" → "copy_rate" (features) and "copy_rate_pixels".

The closest pairs (generated | nearest training image, with their similarity) are drawn, since a person judges
a copy by looking; Dutt et al.'s memorization score (‖ε(x_t, c) − ε(x_t, ∅)‖ over a DDIM trajectory) is scored
on training prompts (the run's own training text, `finetune --deid-markers` applied) and as many held-out ones,
with the words that carry it (each word's share of the prompt's cross-attention, captured over the same
trajectory, times the prompt's score). With `--checkpoints` the copy rate is measured at every checkpoint.

Training features and pixels are cached in `<out>/.features_cache/` (200k MIMIC images take a while on a GPU;
`--privacy-max-train N` searches a seeded sample of N instead, and says so), each run's result in
`runs/<name>/privacy.json` under the key of these settings and the folders' identities.
"""

from cxrdiff.report.privacy.figures import over_training_figure, pairs_figure, privacy_figures
from cxrdiff.report.privacy.measure import (
    copy_rates_over_training,
    measure_privacy,
    measure_privacy_once,
    nearest_in_blocks,
    privacy_settings,
    privacy_unavailable,
)
from cxrdiff.report.privacy.memorization import word_attribution, word_shares
from cxrdiff.report.privacy.tables import privacy_tables

__all__ = [
    "copy_rates_over_training",
    "measure_privacy",
    "measure_privacy_once",
    "nearest_in_blocks",
    "over_training_figure",
    "pairs_figure",
    "privacy_figures",
    "privacy_settings",
    "privacy_tables",
    "privacy_unavailable",
    "word_attribution",
    "word_shares",
]
