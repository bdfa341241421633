"""`cxrdiff ground`: where does the model look when it reads "cardiomegaly"? Phrase grounding from the
UNet's cross-attention, scored against MS-CXR boxes (or COCO instance masks) with the paper's localization metrics.

The paper's procedure (docs/method.md, "Grounding"): a real image's latent is freshly noised to
every timestep of a DDIM schedule (new noise each step) and the UNet reads it with the phrase; the
cross-attention maps of the last `window` steps are averaged (`cxrdiff.attention`). `--mode invert`
instead inverts the latent with DDIM and captures during the reverse pass. The maps of the chosen
tokens are min-max normalised, resized bilinearly to the image frame and scored against the boxes.

Modules: `entry` (check → samples → load → loop → merge), `config` (settings, the `GroundingInput` record),
`inputs` (checks; the format's reader from `READERS`: `mscxr`, `coco`; `single` for `--image`; `rows`, what
readers share), `tokens`, `capture`, `score`, `overlays`, `parts` (resume points, merge), `tables`.
"""

from cxrdiff.ground.capture import capture_maps, grounded_latent
from cxrdiff.ground.config import STEP, GroundConfig, GroundingInput, ground_settings
from cxrdiff.ground.entry import ground
from cxrdiff.ground.inputs import READERS, check_inputs, data_manifest, load_samples
from cxrdiff.ground.overlays import image_overlay, overlay
from cxrdiff.ground.score import masks, normalise, score, scoring_maps, to_frame, to_original
from cxrdiff.ground.tables import BOX_RULES, METRICS, word_analysis
from cxrdiff.ground.tokens import SPECIAL, choose_tokens, word_positions
from cxrdiff.text_encoders import encode_text

__all__ = [
    "BOX_RULES",
    "METRICS",
    "READERS",
    "SPECIAL",
    "STEP",
    "GroundConfig",
    "GroundingInput",
    "capture_maps",
    "check_inputs",
    "choose_tokens",
    "data_manifest",
    "encode_text",
    "ground",
    "ground_settings",
    "grounded_latent",
    "image_overlay",
    "load_samples",
    "masks",
    "normalise",
    "overlay",
    "score",
    "scoring_maps",
    "to_frame",
    "to_original",
    "word_analysis",
    "word_positions",
]
