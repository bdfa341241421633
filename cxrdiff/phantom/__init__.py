"""`cxrdiff phantom`: a synthetic MIMIC-CXR-shaped data set whose findings have a known, exact place.

MIMIC-CXR needs credentialed access, so the demo and the end-to-end tests need a stand-in with the same
files and quirks (JPG + some DICOM, the three CSVs, free-text reports with awkward sections, an MS-CXR box
table) and an honest answer for where each finding is. The pictures are drawn analytically in numpy
(`anatomy`: lungs, heart, mediastinum, spine, ribs, clavicles, domes, soft tissue, noise) and each finding
changes the picture only where its mask says; the box is that mask's bounding box. The reports come from
`report_text`, the tree, tables, DICOM files and the step itself from `tree`, the contact sheet from `preview`;
`config` holds what the step is asked for, and `entry` claims the folder and hands over to the writer of the
kind asked for (`tree`, or `coco` for a COCO-layout set).
Everything random comes from seeds derived from `seed` and the image's position in the plan, so the same
settings write the same bytes.

Sides follow the radiograph convention: the patient's right is on the image's left.
"""

from cxrdiff.phantom.anatomy import (
    LOBES,
    SEVERITY_WORDS,
    SIDES,
    Finding,
    mask_box,
    picture_to_uint8,
    render,
    render_study,
    sample_anatomy,
    sample_finding,
)
from cxrdiff.phantom.config import MS_CXR_FILE, STEP, TRUTH_FILE, PhantomConfig
from cxrdiff.phantom.entry import check_inputs, make_phantom
from cxrdiff.phantom.preview import write_preview
from cxrdiff.phantom.report_text import label_text, write_report_text
from cxrdiff.phantom.tree import METADATA_COLUMNS_FULL, plan_studies, rerender

__all__ = [
    "LOBES",
    "METADATA_COLUMNS_FULL",
    "MS_CXR_FILE",
    "SEVERITY_WORDS",
    "SIDES",
    "STEP",
    "TRUTH_FILE",
    "Finding",
    "PhantomConfig",
    "check_inputs",
    "label_text",
    "make_phantom",
    "mask_box",
    "render",
    "render_study",
    "rerender",
    "sample_anatomy",
    "sample_finding",
    "picture_to_uint8",
    "plan_studies",
    "write_preview",
    "write_report_text",
]
