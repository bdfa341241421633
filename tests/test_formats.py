"""The data format record: read once from the prepared folder's manifest, and every step's registry of
per-format functions covers exactly the formats `choices.DataFormat` names (a new format missing from one
step fails here)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrdiff.artifacts import write_manifest
from cxrdiff.errors import InputError
from cxrdiff.formats import DATA_FORMATS, FORMATS, format_record


def _registries() -> dict[str, dict]:
    from cxrdiff.ground.inputs import READERS
    from cxrdiff.prepare.entry import FORMATS as PREPARE_FORMATS
    from cxrdiff.report.entry import REPORTS

    return {"formats.FORMATS": FORMATS, "prepare FORMATS": PREPARE_FORMATS, "ground READERS": READERS,
            "report REPORTS": REPORTS}  # fmt: skip


@pytest.mark.parametrize("name", ["formats.FORMATS", "prepare FORMATS", "ground READERS", "report REPORTS"])
def test_every_steps_registry_covers_exactly_the_data_formats(name):
    assert sorted(_registries()[name]) == sorted(DATA_FORMATS)


def test_each_record_is_filed_under_its_own_name_and_names_a_ucg_rule_of_finetune():
    from cxrdiff.finetune import FinetuneConfig

    fields = FinetuneConfig.__dataclass_fields__
    for name, record in FORMATS.items():
        assert record.name == name and record.ucg_field in fields and record.regions in ("boxes", "masks")


def test_the_record_is_the_one_the_manifest_names(tmp_path):
    coco, plain, odd = tmp_path / "coco", tmp_path / "plain", tmp_path / "odd"
    write_manifest(coco, "prepare", extra={"format": "coco"})
    write_manifest(plain, "prepare")
    write_manifest(odd, "prepare", extra={"format": "dicom-sr"})
    assert format_record(coco) is FORMATS["coco"]
    assert format_record(plain) is FORMATS["mimic"]  # folders made before formats were recorded
    assert format_record(None) is FORMATS["mimic"]  # --image: no prepared folder
    with pytest.raises(InputError) as caught:
        format_record(odd)
    assert str(caught.value) == f"{odd}: format 'dicom-sr' in its manifest.json is not one of {', '.join(FORMATS)}"


def test_ground_reads_by_the_recorded_format_not_by_the_columns(tmp_path):
    """A table with COCO's columns in a folder prepared as MIMIC is read by the MIMIC reader (and refused for
    its missing columns); the same table in a COCO folder is read as COCO."""
    from cxrdiff.ground import GroundConfig, load_samples

    columns = ("image_id", "category_name", "caption", "word", "mask_rle", "latent_mean", "latent_shape")
    table = pa.table({c: pa.array([], pa.string()) for c in columns})
    for fmt in ("mimic", "coco"):
        write_manifest(tmp_path / fmt, "prepare", extra={"format": fmt} if fmt == "coco" else None)
        pq.write_table(table, tmp_path / fmt / "test.parquet")
    mimic = GroundConfig(data=tmp_path / "mimic" / "test.parquet", latent="mean")
    with pytest.raises(InputError, match=r"missing column\(s\) dicom_id, label_text, boxes, .*expected an ms_cxr"):
        load_samples(mimic)
    with pytest.raises(InputError, match=r"test.parquet: no rows$"):  # the COCO reader: columns there, no rows
        load_samples(GroundConfig(data=tmp_path / "coco" / "test.parquet", latent="mean"))
