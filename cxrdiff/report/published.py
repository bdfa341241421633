"""The paper's published numbers and the measuring protocol, as data (Dombrowski et al., AAAI 2024).

Kept apart from the code so that every transcribed number is checked, and corrected, in one place; the
rendering (`render.py`) only reads these.
"""

from __future__ import annotations

from cxrdiff.data import MS_CXR_CATEGORIES
from cxrdiff.metrics.score import UNTRAINED_LABEL

PUBLISHED_LOCALIZATION = {  # Table 1: AUC-ROC %, Top-1 %, CNR
    "SDv2": {
        "Atelectasis": (58.5, 0.0, 0.23),
        "Cardiomegaly": (53.1, 8.4, 0.14),
        "Consolidation": (59.3, 2.6, 0.21),
        "Edema": (80.2, 15.2, 0.37),
        "Lung Opacity": (64.7, 1.2, 0.87),
        "Pleural Effusion": (48.8, 1.0, 0.34),
        "Pneumonia": (61.3, 0.5, 0.64),
        "Pneumothorax": (71.0, 10.2, 0.01),
        "Average": (60.6, 5.7, 0.321),
    },
    "Finetune_L": {
        "Atelectasis": (45, 2, -0.15),
        "Cardiomegaly": (45, 2, -0.16),
        "Consolidation": (53, 14, 0.05),
        "Edema": (54, 29, 0.09),
        "Lung Opacity": (53, 7, 0.05),
        "Pleural Effusion": (40, 3, -0.27),
        "Pneumonia": (49, 3, -0.05),
        "Pneumothorax": (81, 27, 0.97),
        "Average": (54, 10, 0.133),
    },
    "Finetune_F": {
        "Atelectasis": (86, 80, 1.25),
        "Cardiomegaly": (73, 40, 0.67),
        "Consolidation": (86, 48, 1.22),
        "Edema": (89, 70, 1.36),
        "Lung Opacity": (83, 38, 1.06),
        "Pleural Effusion": (83, 66, 1.05),
        "Pneumonia": (85, 59, 1.16),
        "Pneumothorax": (74, 20, 0.68),
        "Average": (79, 45, 0.920),
    },
}
_T3 = {
    "ConVIRT": (0.86, 0.64, 1.25, 0.78, 0.68, 1.03, 0.28, 1.02, 0.818),
    "GLoRIA": (0.98, 0.53, 1.38, 1.05, 0.66, 1.18, 0.47, 1.20, 0.930),
    "BioViL-L": (1.17, 0.95, 1.45, 1.19, 0.96, 1.19, 0.74, 1.50, 1.142),
}
PUBLISHED_CNR_METHODS = {m: dict(zip((*MS_CXR_CATEGORIES, "Average"), v, strict=True)) for m, v in _T3.items()}
PUBLISHED_FIDELITY = {  # Table 4: FID, FID_XRV, MS-SSIM %
    "SDv2": (237.6, 104.9, 12.9),
    "Finetune_L": (61.9, 7.7, 10.3),
    "Finetune_F": (75.5, 10.1, 10.1),
}
CLASSIFIER_ORDER = (  # Table 5: the class of each value in the tuples below
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Lung Opacity",
    "Edema",
    "Pneumonia",
    "Pneumothorax",
    "Pleural Effusion",
    "Average",
)
_T5 = {
    "real p19": (83.0, 85.5, 87.7, 80.2, 91.4, 75.6, 84.4, 88.7, 84.6),
    "Finetune_L": (75.8, 78.7, 77.8, 75.1, 85.9, 66.2, 79.6, 79.6, 77.3),
    "Finetune_F": (76.8, 79.0, 77.9, 77.5, 84.1, 66.7, 70.1, 84.5, 77.1),
}
PUBLISHED_CLASSIFIER = {m: dict(zip(CLASSIFIER_ORDER, v, strict=True)) for m, v in _T5.items()}
PUBLISHED_TEXT_SOURCE = {  # Table 7: CNR (learnable, frozen)
    "impressions": (0.15, 0.95),
    "synthetic impressions": (0.22, 0.42),
    "class labels": (0.29, 0.80),
}
PAPER = "Dombrowski et al., AAAI 2024"

PROTOCOL = [
    "Images are compared as 8-bit grey; real p19 images are resized (shorter side) and centre-cropped to the "
    "generated images' size.",
    "FID: torch-fidelity's InceptionV3 (2048-d pool features), grey repeated to 3 channels, normalised once "
    "inside torch-fidelity (the reference code normalised twice).",
    "FID_XRV: torchxrayvision DenseNet121 `densenet121-res224-all`, `features2` (1024-d); input grey, resized "
    "to 224 by us (bilinear, antialiased) and scaled to [-1024, 1024]. Note: torchxrayvision's 'all' weights "
    "were trained on data that includes MIMIC-CXR.",
    "Fréchet distances from a custom or untrained feature network are named for their features and never "
    f"called FID; untrained ones are labelled '{UNTRAINED_LABEL}'.",
    "MS-SSIM (torchmetrics, explicit data range 255): the 6 pairs of each prompt's 4 images, never across "
    "prompts; mean per prompt, then mean ± std over prompts, in %. Scales and window in the table notes.",
    "Classifier check: per class d, AUC of the classifier's score for d on images from d-prompts vs images "
    "from 'No Finding' prompts; the same on real p19 images is the reference row ('Pleural Effusion' is "
    "torchxrayvision's 'Effusion').",
    "Grounding: cross-attention maps of the class words, scored against MS-CXR boxes (AUC-ROC and Top-1 in %; "
    "CNR = (mean_in - mean_out) / sqrt(var_in + var_out), convention as recorded per run).",
]
