"""The impression extractor on report texts shaped like real MIMIC-CXR reports (leading spaces, blank
lines, '___' placeholders, headings on their own line or followed by text)."""

import pytest

from cxrdiff.impressions import extract_impression, read_report, report_path, section_name, split_sections

STANDARD = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

NO_IMPRESSION = """                                 FINAL REPORT
 CHEST RADIOGRAPH PERFORMED ON ___

 COMPARISON:  Prior exam from ___.

 CLINICAL HISTORY:  Intubated patient, assess tube position.

 FINDINGS:  The endotracheal tube terminates 4 cm above the carina.  Moderate
 right pleural effusion is
 unchanged.
"""

NO_HEADINGS = """                                 FINAL REPORT
 PORTABLE CHEST OF ___

 Comparison is made to the prior study.


 Mild pulmonary vascular congestion.   Small left effusion
 has slightly increased.

"""


def test_standard_report_takes_the_impression_with_whitespace_normalised():
    assert extract_impression(STANDARD) == ("No acute cardiopulmonary process.", "impression")


def test_findings_fallback_joins_wrapped_lines():
    text, source = extract_impression(NO_IMPRESSION)
    assert source == "findings"
    assert (
        text == "The endotracheal tube terminates 4 cm above the carina. Moderate right pleural effusion is unchanged."
    )


def test_last_paragraph_fallback_is_the_authors_rule():
    """No impression and no findings: everything after the first paragraph of the last section (here the
    only one, whose first paragraph is the 'FINAL REPORT' header), as the MIMIC-CXR authors' parser does."""
    text, source = extract_impression(NO_HEADINGS)
    assert source == "last_paragraph"
    assert text == (
        "Comparison is made to the prior study. Mild pulmonary vascular congestion. Small left effusion has "
        "slightly increased."
    )


def test_fallbacks_only_when_asked_and_in_order():
    assert extract_impression(NO_IMPRESSION, fallbacks=()) == ("", "none")  # impression only: dropped
    assert extract_impression(NO_HEADINGS, fallbacks=()) == ("", "none")
    assert extract_impression(NO_IMPRESSION, fallbacks=("findings",))[1] == "findings"
    # the last paragraph is offered only when the report has neither impression nor findings
    assert extract_impression(NO_IMPRESSION, fallbacks=("last_paragraph",)) == ("", "none")
    assert extract_impression(NO_HEADINGS, fallbacks=("last_paragraph",))[1] == "last_paragraph"
    assert extract_impression(STANDARD, fallbacks=())[1] == "impression"
    with pytest.raises(ValueError, match="comparison"):
        extract_impression(STANDARD, fallbacks=("comparison",))


@pytest.mark.parametrize(
    ("heading", "name"),
    [
        ("SUMMARY", "impression"),  # the authors' table
        ("FINAL IMPRESSION", "impression"),  # contains a main section's name
        ("PORTABLE AP CHEST", "findings"),  # describes the whole study
        ("CHEST, PA AND LATERAL", "findings"),
        ("REASON FOR EXAM", "indication"),
        ("CLINICAL HISTORY AND COMPARISON", "history"),  # the first main name found, in their order
    ],
)
def test_heading_normalisation_follows_the_authors_parser(heading, name):
    assert section_name(heading) == name


@pytest.mark.parametrize(
    "heading",
    [
        "CONCLUSION",
        "CONCLUSIONS",
        "IMPRESSIONS",
        "FINDINGS AND IMPRESSION",
        "FINDINGS/IMPRESSION",
        "IMPRESSON",
        "IMPRESION",
        "IMPRESSOIN",
    ],
)
def test_variant_headings_count_as_impression(heading):
    report = STANDARD.replace(" IMPRESSION:\n\n No acute", f" {heading}:  No acute")
    assert extract_impression(report) == ("No acute cardiopulmonary process.", "impression")


def test_last_impression_wins_even_after_other_sections():
    report = STANDARD + "\n IMPRESSION:  Interval increase in right effusion.\n\n NOTIFICATION:  ___ paged at 10:15.\n"
    assert extract_impression(report) == ("Interval increase in right effusion.", "impression")


def test_short_impression_is_returned_as_is_for_the_caller_to_filter():
    report = STANDARD.replace("No acute cardiopulmonary process.", "  None.  ")
    text, source = extract_impression(report)
    assert (text, source) == ("None.", "impression") and len(text) <= 7


def test_empty_impression_falls_back_to_findings():
    report = STANDARD.replace("No acute cardiopulmonary process.", "")
    text, source = extract_impression(report)
    assert source == "findings" and text.startswith("There is no focal consolidation, pleural effusion")


def test_lower_case_or_inline_colons_are_not_headings():
    report = " FINDINGS:  Line placed at 10:30 by Dr. ___.\n Note: stable appearance.\n"
    sections = split_sections(report)
    assert [name for name, _ in sections] == ["preamble", "findings"]
    assert extract_impression(report) == ("Line placed at 10:30 by Dr. ___. Note: stable appearance.", "findings")


def test_wet_read_and_crlf_line_endings():
    report = (
        "WET READ: ___ ___ 8:12 PM\r\n  No pneumothorax.\r\n\r\n FINAL REPORT\r\n IMPRESSION:\r\n  Stable lines.\r\n"
    )
    assert extract_impression(report) == ("Stable lines.", "impression")
    assert section_name(" Findings  and  Impression ") == "impression"


def test_empty_report_has_no_usable_text():
    assert extract_impression("   \n\n  FINAL REPORT \n \n") == ("", "none")


def test_report_files_and_paths(tmp_path):
    path = report_path(tmp_path, 10000032, 50414267)
    assert path == tmp_path / "p10" / "p10000032" / "s50414267.txt"
    assert read_report(path) == ("", "none", "missing report")
    path.parent.mkdir(parents=True)
    path.write_text(STANDARD)
    assert read_report(path) == ("No acute cardiopulmonary process.", "impression", None)
    path.write_text(NO_IMPRESSION)
    assert read_report(path, fallbacks=()) == ("", "none", None)
    assert read_report(path, fallbacks=("findings",))[1] == "findings"


def test_report_text_is_decoded_as_what_it_is_or_refused(tmp_path):
    """UTF-8 (with or without BOM), UTF-16 with BOM and Windows-1252 read as their text; anything else is a
    fault with its reason, and no replacement character reaches a prompt."""
    from cxrdiff.impressions import decode_report, read_report

    text = "FINAL REPORT\n IMPRESSION:  Small right pleural effusion, 5 mm nodule (Größe ~ 5 mm).\n"
    expected = "Small right pleural effusion, 5 mm nodule (Größe ~ 5 mm)."
    for name, data in [
        ("utf8.txt", text.encode("utf-8")),
        ("bom.txt", b"\xef\xbb\xbf" + text.encode("utf-8")),
        ("utf16.txt", text.encode("utf-16")),
        ("cp1252.txt", text.encode("cp1252")),
    ]:
        (tmp_path / name).write_bytes(data)
        assert read_report(tmp_path / name) == (expected, "impression", None), name
    assert decode_report("Pleural “effusion” – small".encode("cp1252")) == "Pleural “effusion” – small"
    for name, data in [
        ("undefined.txt", text.encode("cp1252") + b"\x81"),  # not UTF-8, and 0x81 is undefined in Windows-1252
        ("replaced.txt", text.replace("ö", "\ufffd").encode("utf-8")),  # already lost upstream
        ("binary.txt", b"\x00\x01\x02IMPRESSION: x\x00"),
    ]:
        (tmp_path / name).write_bytes(data)
        assert read_report(tmp_path / name) == ("", "none", "undecodable report"), name
