"""Reading radiographs and putting them in the model's frame, the same way for every step.

The paper's transform: resize the shorter side to the resolution (bilinear), centre-crop to a square,
scale to [-1, 1], repeat to 3 channels; never flip (laterality is in the text). Boxes and masks go
through the same resize and crop so they stay on the finding.

DICOM files become 8-bit grey the way MIMIC-CXR-JPG was made from MIMIC-CXR's DICOMs (`mimic_cxr_jpg`,
the default), or through the file's own window (`window`). A file that reads but is not one grey
radiograph (colour, several frames, no pixels, another modality) raises `ImageRefused`, whose `reason`
says what it is; README.md ("DICOM input") lists which package decodes which transfer syntax.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cxrdiff.choices import DicomContrast
from cxrdiff.errors import InputError

RADIOGRAPH_MODALITIES = ("CR", "DX", "DR")  # computed and digital radiography (DR: an old code some PACS still write)
_GREY = ("MONOCHROME1", "MONOCHROME2")
EXIF_ORIENTATION = 0x0112


class ImageRefused(InputError):
    """A file that is not one usable grey radiograph; `reason` is what it is (a `skipped.csv` reason)."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def is_dicom(path: str | os.PathLike) -> bool:
    """A `.dcm` name, or the DICOM file magic ('DICM' after a 128-byte preamble), as PACS exports often
    have no suffix."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except OSError as exc:
        raise InputError(f"{path}: unreadable image ({exc})") from None


def load_grayscale(path: str | os.PathLike, dicom_contrast: DicomContrast = "mimic-jpg") -> np.ndarray:
    """An image file (JPG/PNG, or DICOM) as an 8-bit grey array (H, W)."""
    path = Path(path)
    if is_dicom(path):
        return load_dicom(path, dicom_contrast)
    try:
        with Image.open(path) as img:
            img.load()
            if getattr(img, "n_frames", 1) > 1:
                raise ImageRefused(path, "multi-frame image", f"{img.n_frames} frames")
            grey = _pil_grey(upright(img), path)
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: unreadable image ({exc})") from None
    if min(grey.shape) == 0:
        raise ImageRefused(path, "empty image", f"{grey.shape[1]}x{grey.shape[0]} pixels")
    return grey


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: its EXIF orientation applied (phone photos of films carry one)."""
    if img.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return img
    return ImageOps.exif_transpose(img)


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """A photograph (JPG/PNG, any mode) as 8-bit RGB (H, W, 3), for COCO-format data sets."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None
    if min(rgb.shape[:2]) == 0:
        raise ImageRefused(path, "empty image", f"{rgb.shape[1]}x{rgb.shape[0]} pixels")
    return rgb


def _pil_grey(img: Image.Image, path: Path) -> np.ndarray:
    """A PIL image as 8-bit grey: 16-bit and float exports min-max scaled (PIL's own conversion would clip
    them at 255), colour refused unless its channels agree (a grey picture saved as RGB)."""
    if img.mode in ("L", "1", "LA", "La"):
        return np.asarray(img.convert("L"))
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        return _min_max_uint8(values)
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)  # (H, W, 3)
    spread = float(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean()) if rgb.size else 0.0
    if spread > 2.0:  # JPEG's chroma rounding leaves a grey picture's channels within a level or two
        raise ImageRefused(path, "colour image", f"{img.mode}, channels differ by {spread:.1f} grey levels on average")
    return np.asarray(img.convert("L"))


def _min_max_uint8(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) / (high - low) * 255.0).astype(np.uint8)


def load_dicom(path: str | os.PathLike, contrast: DicomContrast = "mimic-jpg") -> np.ndarray:
    """A DICOM radiograph as 8-bit grey (H, W): MIMIC-CXR-JPG's conversion (`mimic-jpg`) or the file's
    own window (`window`: modality LUT, VOI LUT or window, MONOCHROME1 inverted, min-max scaled)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    ds = _read_dicom(path)
    pixels = dicom_pixels(ds, path)
    if float(pixels.min()) == float(pixels.max()):
        raise ImageRefused(path, "blank image", f"every pixel is {pixels.flat[0]}")
    photometric = str(ds.PhotometricInterpretation).upper()
    if contrast == "mimic-jpg":
        return mimic_cxr_jpg(pixels, photometric)
    if contrast != "window":
        raise InputError(f"--dicom-contrast {contrast!r}: not one of mimic-jpg, window")
    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
    if photometric == "MONOCHROME1":
        values = values.max() - values
    return _min_max_uint8(values)


def _read_dicom(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(path)
    except FileNotFoundError:
        raise InputError(f"{path}: DICOM file not found") from None
    except Exception as exc:  # pydicom raises many types for truncated/invalid files
        raise InputError(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc})") from None


def dicom_pixels(ds, path: str | os.PathLike) -> np.ndarray:
    """The stored pixel values (H, W) of a single-frame grey radiograph; anything else is refused with
    what it is, before its pixels are decoded."""
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = getattr(getattr(ds, "SOPClassUID", None), "name", "unknown SOP class")
        raise ImageRefused(path, "no pixel data", str(kind))
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1 or photometric not in _GREY:
        raise ImageRefused(
            path, "colour image", f"{photometric or 'no PhotometricInterpretation'}, {samples} samples per pixel"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    modality = str(ds.get("Modality", "")).upper()
    if frames > 1:
        raise ImageRefused(path, "multi-frame image", f"{frames} frames, modality {modality or 'not given'}")
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise ImageRefused(
            path, "other modality", f"modality {modality}; radiographs are {', '.join(RADIOGRAPH_MODALITIES)}"
        )
    pixels = _decode(ds, Path(path))
    if pixels.ndim != 2 or min(pixels.shape) == 0:
        raise ImageRefused(path, "empty image", f"pixel array of shape {pixels.shape}")
    return pixels


def _decode(ds, path: Path) -> np.ndarray:
    """pydicom's decoders (and the codec packages it finds); 12-bit JPEG Extended through GDCM itself."""
    from pydicom.uid import JPEGExtended12Bit

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax == JPEGExtended12Bit and int(ds.get("BitsStored", 8)) > 8:
        return _gdcm_pixels(ds, path)
    try:
        return ds.pixel_array
    except Exception as exc:  # no decoder for the syntax (NotImplementedError), or a codec's own error
        name = getattr(syntax, "name", None) or "unknown transfer syntax"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImageRefused(path, "undecodable pixel data", f"{name} ({syntax}): {first}") from None


def _gdcm_pixels(ds, path: Path) -> np.ndarray:
    """12-bit JPEG Extended, decoded by GDCM's own reader. pydicom turns GDCM down for 12-bit samples and
    its only other decoder for them (pylibjpeg-libjpeg) is GPL, while GDCM decodes them right (pydicom's
    reference values for its JPGExtended.dcm: 244 at (420, 140), 95 at (230, 120))."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(os.fspath(path))
    if not reader.Read():
        raise ImageRefused(path, "undecodable pixel data", "JPEG Extended (12-bit): GDCM could not read the file")
    buffer = reader.GetImage().GetBuffer().encode("utf-8", "surrogateescape")  # GDCM hands char* back as str
    dtype = np.dtype(f"<{'i' if int(ds.get('PixelRepresentation', 0)) else 'u'}{2 if int(ds.BitsAllocated) > 8 else 1}")
    shape = (int(ds.Rows), int(ds.Columns))
    if len(buffer) != dtype.itemsize * shape[0] * shape[1]:
        raise ImageRefused(path, "undecodable pixel data", f"JPEG Extended (12-bit): GDCM gave {len(buffer)} bytes")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def equalize_histogram(grey: np.ndarray) -> np.ndarray:
    """Histogram equalisation of 8-bit grey as OpenCV's `equalizeHist` defines it (MIMIC-CXR-JPG used
    OpenCV): the lowest occupied level goes to 0, every other level to round(255 · (pixels at or below it,
    less those at the lowest level) / (pixels, less those at the lowest level)). Hand-written in numpy so
    that reading a DICOM needs no OpenCV (a 60 MB wheel) for ten lines."""
    histogram = np.bincount(grey.ravel(), minlength=256)
    lowest = int(np.flatnonzero(histogram)[0])
    rest = grey.size - int(histogram[lowest])
    if rest == 0:  # one grey level: OpenCV leaves it as it is
        return grey.copy()
    above = np.cumsum(histogram) - histogram[lowest]  # pixels above the lowest level, up to each level
    lut = np.rint(np.clip(above, 0, None) * (255.0 / rest)).clip(0, 255).astype(np.uint8)
    return lut[grey]


def mimic_cxr_jpg(pixels: np.ndarray, photometric: str = "MONOCHROME2") -> np.ndarray:
    """MIMIC-CXR-JPG's conversion of a DICOM's stored pixels to 8-bit grey, as its authors describe it
    (Johnson et al. 2019, MIMIC-CXR-JPG on PhysioNet, "Chest radiographs"): subtract the lowest value,
    divide by the highest of the shifted image, scale to 0..255 and truncate to integers; invert
    MONOCHROME1 so that the body is light on a dark background; equalise the histogram (OpenCV). Preparing
    the DICOM release this way gives the images of the JPG release (up to its JPEG compression)."""
    values = pixels.astype(np.float64)
    values -= values.min()
    top = float(values.max())
    scaled = values / top if top > 0 else values
    grey = np.floor(scaled * 255.0).clip(0, 255).astype(np.uint8)
    if str(photometric).upper() == "MONOCHROME1":
        grey = 255 - grey
    return equalize_histogram(grey)


MAX_UPSCALE = 2  # an image whose short side is under half the model's resolution is refused ("image too small")


def too_small(width: int, height: int, resolution: int) -> bool:
    """Whether putting the image in the model's frame would enlarge its short side more than MAX_UPSCALE times."""
    return min(width, height) * MAX_UPSCALE < resolution


def crop_geometry(width: int, height: int, resolution: int) -> tuple[float, float, float]:
    """(scale, left, top): resize by `scale` so the short side is `resolution`, then crop at (left, top)."""
    scale = resolution / min(width, height)
    new_w, new_h = round(width * scale), round(height * scale)
    return scale, (new_w - resolution) // 2, (new_h - resolution) // 2


def resize_center_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    """Shorter side to `resolution` (bilinear), centre-crop to `resolution`²; uint8 in, uint8 out."""
    height, width = image.shape[:2]
    scale, left, top = crop_geometry(width, height, resolution)
    resized = Image.fromarray(image).resize((round(width * scale), round(height * scale)), Image.BILINEAR)
    return np.asarray(resized)[top : top + resolution, left : left + resolution]


def box_to_frame(box: tuple[float, float, float, float], width: int, height: int, resolution: int) -> list[float]:
    """An (x, y, w, h) box in original pixels → the prepared frame, clipped to it."""
    scale, left, top = crop_geometry(width, height, resolution)
    x0, y0 = box[0] * scale - left, box[1] * scale - top
    x1, y1 = (box[0] + box[2]) * scale - left, (box[1] + box[3]) * scale - top
    x0, y0 = min(max(x0, 0.0), resolution), min(max(y0, 0.0), resolution)
    x1, y1 = min(max(x1, 0.0), resolution), min(max(y1, 0.0), resolution)
    return [x0, y0, x1 - x0, y1 - y0]


def boxes_mask(boxes, size: int | tuple[int, int]) -> np.ndarray:
    """A boolean (H, W) mask that is the union of (x, y, w, h) boxes, filled as rows y..y+h, cols x..x+w."""
    height, width = (size, size) if isinstance(size, int) else size
    mask = np.zeros((height, width), dtype=bool)
    for x, y, w, h in boxes:
        r0, c0 = max(int(np.floor(y)), 0), max(int(np.floor(x)), 0)
        r1, c1 = min(int(np.ceil(y + h)), height), min(int(np.ceil(x + w)), width)
        mask[r0:r1, c0:c1] = True
    return mask


def to_model_input(images: np.ndarray):
    """uint8 grey (B, H, W) or (H, W), or colour (B, H, W, 3) → float tensor (B, 3, H, W) in [-1, 1] for the VAE."""
    import torch

    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 4:  # colour (COCO): channels last → first
        return torch.from_numpy(array / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()  # (batch, 3, height, width)
    if array.ndim == 2:
        array = array[None]
    tensor = torch.from_numpy(array / 127.5 - 1.0)  # (batch, height, width)
    return tensor[:, None].repeat(1, 3, 1, 1)  # (batch, 3, height, width)


def grey_from_vae(images) -> np.ndarray:
    """Decoded VAE output (B, 3, H, W) in [-1, 1] → uint8 grey (B, H, W), channels averaged."""
    array = images.detach().float().cpu().clamp(-1, 1).mean(dim=1).numpy()
    return np.round((array + 1.0) * 127.5).astype(np.uint8)


def grey_from_pipeline(images) -> np.ndarray:
    """Pipeline output (B, 3, H, W) in [0, 1] → uint8 grey (B, H, W): the mean over RGB, rounded."""
    array = images.detach().float().cpu().clamp(0, 1).mean(dim=1).numpy()  # (batch, height, width)
    return np.round(array * 255.0).astype(np.uint8)
