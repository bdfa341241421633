"""Reading real radiographs: DICOM in every common encoding (pydicom's and pydicom-data's test files, read in
place, never copied into the repository), MIMIC-CXR-JPG's conversion, and files that are not radiographs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cxrdiff.errors import InputError
from cxrdiff.images import (
    ImageRefused,
    dicom_pixels,
    equalize_histogram,
    load_dicom,
    load_grayscale,
    mimic_cxr_jpg,
    resize_center_crop,
    to_model_input,
)


def real(name: str) -> Path:
    """A test file shipped by pydicom or the pydicom-data wheel (`pip install -e '.[dev]'`); never downloaded."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name}: not installed; pydicom-data is in the dev extra (pip install -e '.[dev]')"
    return Path(path)


def relabelled(name: str, folder: Path, **changes) -> Path:
    """A copy of a real file with some attributes changed (pixel data untouched, still compressed)."""
    ds = pydicom.dcmread(real(name))
    for key, value in changes.items():
        setattr(ds, key, value)
    path = folder / name
    ds.save_as(path, enforce_file_format=False)
    return path


@pytest.fixture(scope="session")
def radiograph():
    """The real computed-radiography chest PA (MONOCHROME1, 15 bit, 1955×1841), decoded once."""
    ds = pydicom.dcmread(real("RG1_UNCR.dcm"))
    return ds, ds.pixel_array


# --- decoding every encoding --------------------------------------------------------------------


def test_jpeg2000_lossless_is_the_uncompressed_radiograph_and_lossy_is_within_a_few_grey_levels(radiograph):
    ds, pixels = radiograph
    assert (str(ds.Modality), str(ds.PhotometricInterpretation), int(ds.BitsStored), pixels.shape) == (
        "CR", "MONOCHROME1", 15, (1955, 1841),
    )  # fmt: skip
    lossless = pydicom.dcmread(real("RG1_J2KR.dcm"))
    assert lossless.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    assert np.array_equal(dicom_pixels(lossless, "RG1_J2KR.dcm"), pixels)
    lossy = pydicom.dcmread(real("RG1_J2KI.dcm"))
    assert lossy.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000
    error = np.abs(dicom_pixels(lossy, "RG1_J2KI.dcm").astype(float) - pixels) / pixels.max()
    assert 0 < error.mean() < 0.003 and np.percentile(error, 99) < 0.02  # of the 15-bit range
    grey = mimic_cxr_jpg(pixels, "MONOCHROME1").astype(int)
    grey_lossy = load_grayscale(real("RG1_J2KI.dcm")).astype(int)
    assert np.abs(grey_lossy - grey).mean() < 2.0 and np.percentile(np.abs(grey_lossy - grey), 99) <= 12


# (file, a modality to write into a copy when the original is not a radiograph, check of the decoded pixels)
ENCODINGS = {
    # pydicom's reference values for these files (its pixel tests)
    "JPEG Lossless P14 SV1": ("JPEG-LL.dcm", "CR", lambda a: tuple(a[400, 124:132]) == (60, 58, 61, 68, 59, 65, 64, 67)
                              and tuple(a[600, 124:132]) == (3, 1, 2, 0, 2, 1, 2, 0)),
    "JPEG Extended 12-bit": ("JPGExtended.dcm", "CR", lambda a: (a[420, 140], a[230, 120]) == (244, 95)),
    "JPEG Extended 12-bit (Se 0)": ("JPEG-lossy.dcm", "DX", lambda a: (a[420, 140], a[230, 120]) == (244, 95)),
    "JPEG-LS near-lossless": ("JPEGLSNearLossless_16.dcm", "DX", lambda a: a[:45:5, 0].tolist()
                              == [65535, 32765, 16385, 4095, 1025, 255, 65, 15, 5]),
    # the same MR slice stored in other encodings decodes to exactly its pixels
    "JPEG-LS lossless": ("MR_small_jpeg_ls_lossless.dcm", "DX", "MR_small.dcm"),
    "JPEG 2000 lossless": ("MR_small_jp2klossless.dcm", "DX", "MR_small.dcm"),
    "RLE lossless": ("MR_small_RLE.dcm", "DX", "MR_small.dcm"),
    "explicit big endian": ("MR_small_bigendian.dcm", "DX", "MR_small.dcm"),
    "implicit little endian": ("MR_small_implicit.dcm", "DX", "MR_small.dcm"),
    "deflated": ("image_dfl.dcm", "DX", lambda a: a.shape == (512, 512) and a.dtype == np.uint8 and a.std() > 10),
}  # fmt: skip


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_every_encoding_decodes(encoding, tmp_path):
    name, modality, check = ENCODINGS[encoding]
    path = relabelled(name, tmp_path, Modality=modality)
    pixels = dicom_pixels(pydicom.dcmread(path), path)
    if isinstance(check, str):
        assert np.array_equal(pixels, pydicom.dcmread(real(check)).pixel_array)
    else:
        assert check(pixels), encoding
    grey = load_grayscale(path)
    assert grey.dtype == np.uint8 and grey.shape == pixels.shape and grey.min() == 0 and grey.max() == 255


def test_jpeg_baseline_grey_decodes_like_pillow(tmp_path):
    """8-bit baseline JPEG (no grey one ships with pydicom): a radiograph's bytes wrapped in a DX file."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    grey = mimic_cxr_jpg(pydicom.dcmread(real("RG3_UNCR.dcm")).pixel_array[::8, ::8], "MONOCHROME1")
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG", quality=90)
    ds = pydicom.dcmread(real("RG3_UNCR.dcm"))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.Rows, ds.Columns = grey.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PhotometricInterpretation = 8, 8, 7, "MONOCHROME2"
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "baseline.dcm"
    ds.save_as(path, enforce_file_format=True)
    decoded = dicom_pixels(pydicom.dcmread(path), path).astype(int)
    with Image.open(io.BytesIO(buffer.getvalue())) as img:
        assert np.abs(decoded - np.asarray(img, dtype=int)).max() <= 1


def test_an_unsupported_transfer_syntax_says_which(tmp_path):
    path = relabelled("MR_small.dcm", tmp_path, Modality="DX")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder, as for any unknown syntax
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageRefused, match=r"undecodable pixel data \(MPEG2 .*1\.2\.840\.10008\.1\.2\.4\.100") as info:
        load_grayscale(path)
    assert info.value.reason == "undecodable pixel data" and info.value.exit_code == 2


# --- what is not a radiograph -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason", "detail"),
    [
        ("SC_rgb.dcm", "colour image", "RGB, 3 samples per pixel"),
        ("SC_rgb_jpeg_dcmtk.dcm", "colour image", "YBR_FULL, 3 samples per pixel"),
        ("emri_small.dcm", "multi-frame image", "10 frames, modality MR"),
        ("rtplan.dcm", "no pixel data", "RT Plan Storage"),
        ("MR_small.dcm", "other modality", "modality MR"),
        ("CT_small.dcm", "other modality", "modality CT"),
    ],
)
def test_files_that_are_not_radiographs_are_refused_with_what_they_are(name, reason, detail):
    with pytest.raises(ImageRefused) as info:
        load_grayscale(real(name))
    assert info.value.reason == reason and detail in info.value.detail and "empty" not in str(info.value)


def test_other_images_that_are_not_radiographs(tmp_path):
    rng = np.random.default_rng(0)
    colour = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(colour, quality=95)
    with pytest.raises(ImageRefused, match="colour image"):
        load_grayscale(colour)
    grey_as_rgb = tmp_path / "grey.jpg"  # a grey picture saved with three equal channels is grey
    grey = rng.integers(0, 255, (32, 40), dtype=np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(grey_as_rgb, quality=95)
    assert load_grayscale(grey_as_rgb).shape == (32, 40)
    sixteen = tmp_path / "export.png"  # a 16-bit PNG export: scaled, not clipped at 255 as PIL's convert does
    Image.fromarray(np.array([[0, 1000], [3000, 4000]], dtype=np.uint16)).save(sixteen)
    assert load_grayscale(sixteen).tolist() == [[0, 64], [191, 255]]
    frames = tmp_path / "cine.tif"
    Image.fromarray(grey).save(frames, save_all=True, append_images=[Image.fromarray(grey)])
    with pytest.raises(ImageRefused, match="multi-frame image"):
        load_grayscale(frames)
    blank = relabelled("MR_small.dcm", tmp_path, Modality="DX")
    ds = pydicom.dcmread(blank)
    ds.PixelData = np.full((64, 64), 7, dtype="<i2").tobytes()
    ds.save_as(blank)
    with pytest.raises(ImageRefused, match="blank image .every pixel is 7"):
        load_grayscale(blank)
    with pytest.raises(InputError, match="missing.dcm: DICOM file not found"):
        load_grayscale(tmp_path / "missing.dcm")


def test_a_dicom_without_a_suffix_is_read_as_dicom(tmp_path):
    """PACS exports are often named IM0001 or by their UID: the file's 'DICM' magic decides."""
    path = tmp_path / "IM0001"
    path.write_bytes(real("RG3_UNCR.dcm").read_bytes())
    assert np.array_equal(load_grayscale(path), load_grayscale(real("RG3_UNCR.dcm")))


# --- MIMIC-CXR-JPG's conversion -----------------------------------------------------------------


def test_equalisation_and_the_conversion_by_hand():
    # levels 0 (2 pixels), 1 (1), 2 (3), 3 (2): the lowest goes to 0, the others to round(255 · above / 6)
    grey = np.array([[0, 0, 1, 2], [2, 2, 3, 3]], dtype=np.uint8)
    assert equalize_histogram(grey).tolist() == [[0, 0, 42, 170], [170, 170, 255, 255]]  # 42.5 rounds to even
    assert equalize_histogram(np.full((2, 2), 9, np.uint8)).tolist() == [[9, 9], [9, 9]]  # one level: as it is
    # 12-bit values: shifted [0, 0, 1000, 4000] / 4000 · 255 truncated to [0, 0, 63, 255], then equalised
    pixels = np.array([[100, 100], [1100, 4100]], dtype=np.uint16)
    assert mimic_cxr_jpg(pixels, "MONOCHROME2").tolist() == [[0, 0], [128, 255]]  # 127.5 rounds to even
    # MONOCHROME1: inverted after the scaling to [255, 255, 192, 0]; levels 0 (1), 192 (1), 255 (2)
    assert mimic_cxr_jpg(pixels, "MONOCHROME1").tolist() == [[255, 255], [85, 0]]


def test_the_converted_radiograph_looks_like_mimic_cxr_jpg(radiograph, tmp_path):
    """Spread over the whole grey range, as equalised MIMIC-CXR-JPG images are; the file's own (very wide)
    window leaves it bunched at the bright end with pale lungs. Writes a preview to look at."""
    ds, pixels = radiograph
    mimic = mimic_cxr_jpg(pixels, str(ds.PhotometricInterpretation))
    window = load_dicom(real("RG1_UNCR.dcm"), "window")
    quarters = np.histogram(mimic, bins=4, range=(0, 256))[0] / mimic.size
    assert 110 <= np.median(mimic) <= 146 and np.all((quarters > 0.18) & (quarters < 0.32)), quarters
    assert np.percentile(mimic, 5) < 25 and np.percentile(mimic, 95) > 230
    assert np.median(window) > 190 and np.percentile(window, 25) > 140  # the median 208
    # MONOCHROME1 inverted: the lungs (rows 500-1000, either side) dark, the spine between them light
    lungs, spine = mimic[500:1000, np.r_[300:650, 1200:1550]].mean(), mimic[500:1000, 850:1000].mean()
    assert lungs < 70 and spine > 160  # measured: 45 and 191 (the window: 140 and 226)
    preview = tmp_path / "rg1_window_vs_mimic-jpg.png"
    Image.fromarray(np.hstack([window, mimic])[::4, ::4]).save(preview)
    with Image.open(preview) as img:
        assert img.size == ((2 * 1841 + 3) // 4, (1955 + 3) // 4)


@pytest.mark.parametrize("contrast", ["mimic-jpg", "window"])
def test_a_monochrome2_copy_gives_nearly_the_same_latent(radiograph, tmp_path, tiny_model, contrast):
    """Stored inverted with an inverted window, the same radiograph must reach the VAE as the same picture."""
    import torch
    from diffusers import AutoencoderKL

    ds, pixels = radiograph
    top = 2 ** int(ds.BitsStored) - 1
    copy = pydicom.dcmread(real("RG1_UNCR.dcm"))
    copy.PixelData = (top - pixels.astype(np.int64)).astype("<u2").tobytes()
    copy.PhotometricInterpretation = "MONOCHROME2"
    copy.WindowCenter = top - float(ds.WindowCenter)
    path = tmp_path / "rg1_monochrome2.dcm"
    copy.save_as(path)
    vae = AutoencoderKL.from_pretrained(tiny_model / "vae").eval()
    latents = []
    for file in (real("RG1_UNCR.dcm"), path):
        grey = resize_center_crop(load_grayscale(file, contrast), 64)
        with torch.no_grad():
            latents.append(vae.encode(to_model_input(grey)).latent_dist.mean[0].numpy())  # (4, 16, 16)
    assert np.abs(latents[0] - latents[1]).max() < 0.05 * latents[0].std()
    greys = [load_grayscale(f, contrast).astype(int) for f in (real("RG1_UNCR.dcm"), path)]
    assert np.abs(greys[0] - greys[1]).mean() < 1.0
