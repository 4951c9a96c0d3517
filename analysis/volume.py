"""Series -> HU volume.

CONTRACT (other modules build on these names; keep them):

    load_series(paths: Sequence[str | Path]) -> CTVolume
        Reads the files of ONE series (pydicom, pylibjpeg plugins for compressed syntaxes), sorts the
        slices along the slice normal, applies RescaleSlope/Intercept and PixelPaddingValue, and
        returns a CTVolume. Raises analysis.results.SeriesSkipped(reason) for a localizer, a non-axial
        or a non-CT series, and ValueError with a clear message for unreadable input.

    CTVolume (below).

Details of what ``load_series`` does:

- Files are read leniently (``force=True``): vendor files without a preamble or with small
  encoding errors still load. A file that cannot be parsed at all, has no Pixel Data or cannot be
  decoded raises ``ValueError`` naming the file (never the patient).
- Single-frame CT Image Storage and multi-frame Enhanced CT / Legacy Converted Enhanced CT are
  accepted. For multi-frame objects geometry, rescale and CTDIvol come from the per-frame functional
  groups, falling back to the shared functional groups.
- Slices are sorted by their position along the slice normal ``n = row_dir x col_dir`` (the dot
  product of ImagePositionPatient with ``n``), never by InstanceNumber. This is correct for gantry
  tilt (the normal is tilted, positions along it are still ordered) and for uneven spacing (the
  positions are kept as they are; ``meta["uneven_spacing"]`` flags it). Only when no slice carries
  ImagePositionPatient/ImageOrientationPatient are InstanceNumber and SliceLocation used, with a
  warning and ``meta["geometry_source"] = "InstanceNumber"``.
- A series is *axial* when the slice normal is within 45 degrees of the patient z axis (this
  accepts any real gantry tilt, which is at most about 30 degrees). Sagittal/coronal reformats are
  skipped.
- Files that are not axial CT images (a localizer, a dose screen or other non-CT-image object, a
  colour image) are left out of an otherwise usable series and counted in
  ``meta["ignored_files"]`` / ``meta["ignored_reasons"]``; when nothing usable remains the series
  is skipped with that reason.
- HU = stored value * RescaleSlope + RescaleIntercept (per slice / per frame). Pixels equal to
  PixelPaddingValue (or inside [PixelPaddingValue, PixelPaddingRangeLimit]) are set to -1024 HU
  (air), as are values below -1500 HU, which no real tissue or air has (out-of-field fill values
  written without a padding tag, e.g. -2000 or -3024, and undershoot of lossy compression).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from analysis.results import SeriesSkipped

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
CT_SOP_CLASSES = frozenset(
    {CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE}
)
MULTIFRAME_CT_SOP_CLASSES = frozenset({ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE})

AIR_HU = -1024.0
FILL_BELOW_HU = -1500.0  # anything below is an out-of-field fill value, not a measurement
MAX_AXIAL_TILT_DEG = 45.0
# Plausible CT numbers: a pixel above this (after rescale) is metal or garbage. Metal is compact;
# the pixels of a corrupt compressed stream are scattered: a slice with more than
# MAX_SCATTERED_FRACTION of its pixels above PLAUSIBLE_MAX_HU *and* without 4 such neighbours of their
# 8 does not hold CT numbers.
PLAUSIBLE_MAX_HU = 4000.0
MAX_SCATTERED_FRACTION = 0.001
# CTDIPhantomTypeCodeSequence code values (DCM) -> phantom diameter in cm
CTDI_PHANTOM_CODES: dict[str, float] = {"113691": 32.0, "113690": 16.0}


@dataclass
class CTVolume:
    hu: np.ndarray  # float32 (n_slices, rows, cols), HU, padding -> -1024 (air), sorted along the normal
    pixel_spacing_mm: tuple[float, float]  # (row spacing, column spacing)
    slice_positions_mm: np.ndarray  # (n_slices,) position along the slice normal
    sop_instance_uids: list[str]  # per slice; multi-frame: the same UID repeated
    frame_numbers: list[int | None]  # per slice; 1-based frame number for multi-frame, else None
    sop_class_uids: list[str]  # per slice
    ctdivol_mgy: np.ndarray  # (n_slices,) float, nan where the slice has no CTDIvol
    headers: list  # per slice: pydicom Dataset WITHOUT PixelData (multi-frame: the one dataset, repeated)
    meta: dict = field(default_factory=dict)  # kvp, kernel, slice_thickness_mm, body_part, protocol, ...
    # (n_slices, rows, cols) bool body masks, filled once by analysis.mask.volume_body_masks
    body_masks: np.ndarray | None = field(default=None, repr=False)

    @property
    def header(self):
        """The first slice's header: patient, study, series and equipment modules."""
        return self.headers[0]

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])


@dataclass(frozen=True)
class _Slice:
    """One decoded 2D image before sorting."""

    hu: np.ndarray
    position: np.ndarray | None  # ImagePositionPatient (3,)
    orientation: np.ndarray | None  # ImageOrientationPatient (6,)
    spacing: tuple[float, float] | None
    thickness: float | None
    ctdivol: float
    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None
    instance_number: int | None
    slice_location: float | None
    header: Dataset
    block_index: int | None = None  # row of the preallocated volume that holds ``hu``


# --------------------------------------------------------------------------------------------
# small tolerant accessors


def _floats(value, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _float(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str):
            value = list(value)[0]
        out = float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return out if np.isfinite(out) else None


def _int(value) -> int | None:
    f = _float(value)
    return None if f is None else int(f)


def _str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, str)):
        value = "\\".join(str(v) for v in value)
    s = str(value).strip()
    return s or None


def _get(ds: Dataset, keyword: str):
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # malformed element: treat as absent
        log.debug("cannot read %s: %s", keyword, exc)
        return None


def _fg_find(groups: list[Dataset], keyword: str):
    """Find ``keyword`` in functional group items (each item holds macro sequences)."""
    for item in groups:
        if item is None:
            continue
        for elem in item:
            if elem.VR != "SQ":
                continue
            for sub in elem.value:
                val = _get(sub, keyword)
                if val is not None and val != "":
                    return val
    return None


def _find_anywhere(ds: Dataset, keyword: str):
    """Top level first, then shared and first per-frame functional groups (Enhanced CT)."""
    val = _get(ds, keyword)
    if val is not None and val != "":
        return val
    groups = []
    shared = _get(ds, "SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame:
        groups.append(per_frame[0])
    return _fg_find(groups, keyword)


def _image_type_values(ds: Dataset) -> list[str]:
    v = _get(ds, "ImageType")
    if v is None:
        return []
    return [str(x).strip().upper() for x in ([v] if isinstance(v, str) else v)]


# --------------------------------------------------------------------------------------------
# reading


def _read(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(str(path), force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"Cannot read DICOM file {path.name!r}: {exc}") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise ValueError(f"File {path.name!r} is not a DICOM image (no SOP Class, Modality or Pixel Data)")
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        # lenient: a file without file meta is most often implicit VR little endian
        ds.file_meta = getattr(ds, "file_meta", Dataset())
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return ds


def _check_ct(ds: Dataset, name: str) -> None:
    modality = _str(_get(ds, "Modality"))
    sop_class = _str(_get(ds, "SOPClassUID"))
    if modality is not None and modality.upper() != "CT":
        raise SeriesSkipped(f"not a CT series (Modality {modality})")
    if sop_class is not None and sop_class not in CT_SOP_CLASSES:
        raise SeriesSkipped(f"not a CT image (SOP Class UID {sop_class})")
    if modality is None and sop_class is None:
        raise SeriesSkipped("not a CT series (neither Modality nor SOP Class UID present)")
    image_type = _image_type_values(ds)
    if "LOCALIZER" in image_type:
        raise SeriesSkipped("localizer (ImageType LOCALIZER)")
    if "PixelData" not in ds:
        raise ValueError(f"File {name!r} has no Pixel Data")


_NATIVE_LE = frozenset({pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian})


def _native_fast(ds: Dataset) -> np.ndarray | None:
    """Uncompressed little-endian 16-bit greyscale single frame: view the bytes directly (what
    ``pixel_array`` returns for these, without its per-call overhead). None when not applicable."""
    try:
        if ds.file_meta.TransferSyntaxUID not in _NATIVE_LE:
            return None
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits_alloc, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        if bits_alloc != 16 or (signed and bits_stored != 16) or int(ds.get("SamplesPerPixel", 1)) != 1:
            return None
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            return None
        raw = ds.PixelData
    except (AttributeError, TypeError, ValueError, KeyError):
        return None
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < rows * cols * 2:
        return None
    return np.frombuffer(raw, dtype="<i2" if signed else "<u2", count=rows * cols).reshape(rows, cols)


def _decode(ds: Dataset, name: str) -> np.ndarray:
    fast = _native_fast(ds)
    if fast is not None:
        return fast
    try:
        arr = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, TypeError, KeyError) as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise ValueError(
            f"Cannot decode the pixel data of {name!r} (transfer syntax {ts}): {exc}. "
            "Compressed syntaxes need the pylibjpeg plugins (libjpeg, openjpeg, rle)."
        ) from exc
    if _int(_get(ds, "SamplesPerPixel")) not in (None, 1):
        raise SeriesSkipped(f"not a greyscale CT image (SamplesPerPixel {ds.SamplesPerPixel})")
    return arr


def _padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    pad = _get(ds, "PixelPaddingValue")
    if pad is None:
        return None
    pad_v = _int(pad)
    if pad_v is None:
        return None
    bits = _int(_get(ds, "BitsStored")) or 16
    signed = _int(_get(ds, "PixelRepresentation")) == 1
    if signed and pad_v >= 2 ** (bits - 1):  # read with the unsigned VR: reinterpret
        pad_v -= 2**bits
    limit = _int(_get(ds, "PixelPaddingRangeLimit"))
    if limit is not None:
        if signed and limit >= 2 ** (bits - 1):
            limit -= 2**bits
        lo, hi = min(pad_v, limit), max(pad_v, limit)
        return (stored >= lo) & (stored <= hi)
    return stored == pad_v


def _to_hu(stored: np.ndarray, slope: float, intercept: float, pad_mask: np.ndarray | None,
           out: np.ndarray | None = None) -> np.ndarray:
    if out is None:
        hu = stored.astype(np.float32)
    else:
        hu = out
        hu[...] = stored
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    if pad_mask is not None:
        hu[pad_mask] = AIR_HU
    hu[hu < FILL_BELOW_HU] = AIR_HU
    return hu


def _single_frame(ds: Dataset, name: str, out: np.ndarray | None = None, block_index: int | None = None) -> _Slice:
    """One single-frame image; ``out`` (float32, the right shape) receives the HU when given."""
    stored = _decode(ds, name)
    if stored.ndim != 2:
        raise ValueError(f"File {name!r}: expected one 2D frame, got pixel array of shape {stored.shape}")
    if out is not None and out.shape != stored.shape:
        out, block_index = None, None
    slope = _float(_get(ds, "RescaleSlope"))
    intercept = _float(_get(ds, "RescaleIntercept"))
    hu = _to_hu(stored, 1.0 if slope is None else slope, 0.0 if intercept is None else intercept,
                _padding_mask(stored, ds), out)
    ps = _floats(_get(ds, "PixelSpacing"), 2)
    ctdi = _float(_get(ds, "CTDIvol"))
    del ds.PixelData
    return _Slice(
        hu=hu,
        position=_floats(_get(ds, "ImagePositionPatient"), 3),
        orientation=_floats(_get(ds, "ImageOrientationPatient"), 6),
        spacing=None if ps is None else (float(ps[0]), float(ps[1])),
        thickness=_float(_get(ds, "SliceThickness")),
        ctdivol=np.nan if ctdi is None else ctdi,
        sop_instance_uid=_str(_get(ds, "SOPInstanceUID")) or "",
        sop_class_uid=_str(_get(ds, "SOPClassUID")) or CT_IMAGE_STORAGE,
        frame_number=None,
        instance_number=_int(_get(ds, "InstanceNumber")),
        slice_location=_float(_get(ds, "SliceLocation")),
        header=ds,
        block_index=block_index if out is not None else None,
    )


def _multi_frame(ds: Dataset, name: str) -> list[_Slice]:
    stored = _decode(ds, name)
    n_frames = _int(_get(ds, "NumberOfFrames")) or 1
    if stored.ndim == 2:
        stored = stored[None]
    if stored.ndim != 3 or stored.shape[0] != n_frames:
        raise ValueError(f"File {name!r}: NumberOfFrames {n_frames} but pixel array of shape {stored.shape}")
    shared = _get(ds, "SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else None
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence") or []
    frame_type = _fg_find([shared_item, per_frame[0] if per_frame else None], "FrameType")
    if frame_type is not None and "LOCALIZER" in [str(v).upper() for v in frame_type]:
        raise SeriesSkipped("localizer (FrameType LOCALIZER)")
    top_slope = _float(_get(ds, "RescaleSlope"))
    top_intercept = _float(_get(ds, "RescaleIntercept"))
    top_ctdi = _float(_get(ds, "CTDIvol"))
    sop_uid = _str(_get(ds, "SOPInstanceUID")) or ""
    sop_class = _str(_get(ds, "SOPClassUID")) or ENHANCED_CT_IMAGE_STORAGE
    slices: list[_Slice] = []
    pad_all = _padding_mask(stored, ds)
    for i in range(n_frames):
        groups = [per_frame[i] if i < len(per_frame) else None, shared_item]

        def fg(keyword: str, groups=groups):
            return _fg_find(groups, keyword)

        slope = _float(fg("RescaleSlope"))
        intercept = _float(fg("RescaleIntercept"))
        slope = slope if slope is not None else (top_slope if top_slope is not None else 1.0)
        intercept = intercept if intercept is not None else (top_intercept if top_intercept is not None else 0.0)
        ps = _floats(fg("PixelSpacing"), 2)
        ctdi = _float(fg("CTDIvol"))
        ctdi = ctdi if ctdi is not None else top_ctdi
        slices.append(
            _Slice(
                hu=_to_hu(stored[i], slope, intercept, None if pad_all is None else pad_all[i]),
                position=_floats(fg("ImagePositionPatient"), 3),
                orientation=_floats(fg("ImageOrientationPatient"), 6),
                spacing=None if ps is None else (float(ps[0]), float(ps[1])),
                thickness=_float(fg("SliceThickness")),
                ctdivol=np.nan if ctdi is None else ctdi,
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
                frame_number=i + 1,
                instance_number=_int(_get(ds, "InstanceNumber")),
                slice_location=None,
                header=ds,
            )
        )
    del ds.PixelData
    return slices


# --------------------------------------------------------------------------------------------
# geometry


def _normal(orientation: np.ndarray) -> np.ndarray:
    row, col = orientation[:3], orientation[3:]
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise ValueError(f"ImageOrientationPatient {orientation.tolist()} has parallel row and column vectors")
    return n / norm


def _sort(slices: list[_Slice], meta: dict) -> tuple[list[_Slice], np.ndarray]:
    with_geom = [s for s in slices if s.position is not None and s.orientation is not None]
    if with_geom and len(with_geom) != len(slices):
        raise ValueError(
            f"{len(slices) - len(with_geom)} of {len(slices)} slices lack ImagePositionPatient or "
            "ImageOrientationPatient; cannot order the series"
        )
    if not with_geom:
        log.warning("no ImagePositionPatient/ImageOrientationPatient: ordering by InstanceNumber")
        meta["geometry_source"] = "InstanceNumber"
        order = sorted(range(len(slices)), key=lambda i: (slices[i].instance_number or 0, i))
        ordered = [slices[i] for i in order]
        locs = [s.slice_location for s in ordered]
        if all(v is not None for v in locs):
            pos = np.asarray(locs, dtype=np.float64)
        else:
            step = ordered[0].thickness or 1.0
            pos = np.arange(len(ordered), dtype=np.float64) * step
        meta["gantry_tilt_deg"] = None
        return ordered, pos
    meta["geometry_source"] = "ImagePositionPatient"
    ref = slices[0].orientation
    for s in slices[1:]:
        if np.max(np.abs(s.orientation - ref)) > 1e-3:
            raise SeriesSkipped("slices of the series have different ImageOrientationPatient")
    normal = _normal(ref)
    tilt = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
    if tilt > MAX_AXIAL_TILT_DEG:
        raise SeriesSkipped(f"not axial (slice normal {tilt:.0f} degrees from the patient z axis)")
    # gantry tilt: angle of the in-plane column direction out of the axial plane
    meta["gantry_tilt_deg"] = round(tilt, 3)
    pos = np.asarray([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(pos, kind="stable")
    return [slices[i] for i in order], pos[order]


def _series_meta(ds: Dataset) -> dict:
    phantom_code = None
    phantom_meaning = None
    seq = _find_anywhere(ds, "CTDIPhantomTypeCodeSequence")
    if seq:
        phantom_code = _str(_get(seq[0], "CodeValue"))
        phantom_meaning = _str(_get(seq[0], "CodeMeaning"))
    return {
        "kvp": _float(_find_anywhere(ds, "KVP")),
        "kernel": _str(_find_anywhere(ds, "ConvolutionKernel")),
        "body_part": _str(_find_anywhere(ds, "BodyPartExamined")),
        "protocol": _str(_get(ds, "ProtocolName")),
        "series_description": _str(_get(ds, "SeriesDescription")),
        "manufacturer": _str(_get(ds, "Manufacturer")),
        "model": _str(_get(ds, "ManufacturerModelName")),
        "device_serial": _str(_get(ds, "DeviceSerialNumber")),
        "station_name": _str(_get(ds, "StationName")),
        "ctdi_phantom": phantom_code,
        "ctdi_phantom_meaning": phantom_meaning,
        "ctdi_phantom_diameter_cm": CTDI_PHANTOM_CODES.get(phantom_code or ""),
        "series_instance_uid": _str(_get(ds, "SeriesInstanceUID")),
    }


def _permute_rows(arr: np.ndarray, order: list[int]) -> np.ndarray:
    """In place ``arr[:] = arr[order]`` following the permutation's cycles with one slice buffer
    (no second copy of the volume)."""
    n = len(order)
    done = np.zeros(n, dtype=bool)
    tmp = np.empty_like(arr[0])
    for start in range(n):
        if done[start] or order[start] == start:
            done[start] = True
            continue
        tmp[...] = arr[start]
        j = start
        while True:
            done[j] = True
            k = order[j]
            if k == start:
                arr[j] = tmp
                break
            arr[j] = arr[k]
            j = k
    return arr


def check_plausible_hu(hu: np.ndarray, sop_instance_uids: Sequence[str] | None = None) -> None:
    """ValueError when a slice's pixels do not decode to plausible CT numbers (see PLAUSIBLE_MAX_HU).

    Padding and out-of-field fill are already air here. Only slices with many pixels above the
    limit are examined (one box sum each), so an ordinary series costs one comparison per pixel."""
    from scipy import ndimage

    n_px = hu.shape[1] * hu.shape[2]
    limit = MAX_SCATTERED_FRACTION * n_px
    counts = np.count_nonzero((hu > PLAUSIBLE_MAX_HU).reshape(hu.shape[0], -1), axis=1)
    for i in np.flatnonzero(counts > limit):
        high = hu[i] > PLAUSIBLE_MAX_HU
        neighbours = ndimage.uniform_filter(high.astype(np.float32), size=3, mode="constant") * 9.0 - high
        scattered = int(np.count_nonzero(high & (neighbours < 3.5)))
        if scattered > limit:
            which = f" ({sop_instance_uids[i]})" if sop_instance_uids is not None else ""
            raise ValueError(
                f"pixels do not decode to plausible CT numbers: slice {i + 1} of {hu.shape[0]}{which} has "
                f"{scattered / n_px:.2%} scattered pixels above {PLAUSIBLE_MAX_HU:.0f} HU (up to "
                f"{float(hu[i].max()):.0f}); a corrupt compressed stream or wrong rescale"
            )


def _spacing_note(steps: np.ndarray, n: int) -> str:
    """What a reader of the results must know of uneven slice positions: missing slices (steps of
    1.5 or more times the series' usual spacing) or, else, the range of the spacing."""
    usual = float(np.median(steps))
    if usual > 0:
        gaps = steps[steps >= 1.5 * usual]
        if gaps.size:
            missing = int(sum(round(float(g) / usual) - 1 for g in gaps))
            return (f"slice gap: about {missing} slice(s) missing at {gaps.size} place(s) (a step of up to "
                    f"{float(gaps.max()):.1f} mm where the series' spacing is {usual:.1f} mm); the metrics are "
                    f"from the {n} slices present")
    return f"uneven slice spacing ({float(np.min(steps)):.2f} to {float(np.max(steps)):.2f} mm)"


def series_notes(meta: dict) -> list[str]:
    """Notes on how complete and regular a loaded series is (``load_series``' meta), for the SR,
    ``analyze --json`` and the log: missing or unevenly spaced slices, slices at one position,
    files left out. Empty for a regular series."""
    notes = []
    if meta.get("spacing_note"):
        notes.append(str(meta["spacing_note"]))
    if meta.get("duplicate_positions"):
        notes.append("two or more slices at the same position")
    if meta.get("ignored_files"):
        notes.append(f"{meta['ignored_files']} file(s) left out: {meta.get('ignored_reasons') or 'not usable'}")
    return notes


def load_series(paths: Sequence[str | Path]) -> CTVolume:
    """Read the files of one CT series into a sorted HU volume (see the module docstring)."""
    if isinstance(paths, (str, Path)):
        raise ValueError(f'Argument "paths" must be a sequence of file paths, got a single path {paths!r}')
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError('Argument "paths" is empty: a series needs at least one file')
    slices: list[_Slice] = []
    series_uids: set[str] = set()
    first_ds: Dataset | None = None
    block: np.ndarray | None = None
    n_block = 0
    ignored: list[str] = []
    for path in paths:
        ds = _read(path)
        uid = _str(_get(ds, "SeriesInstanceUID"))
        if uid:
            series_uids.add(uid)
            if len(series_uids) > 1:
                raise ValueError(
                    f"Files belong to more than one series ({len(series_uids)} SeriesInstanceUIDs); "
                    "pass the files of one series only"
                )
        try:
            _check_ct(ds, path.name)
            sop_class = _str(_get(ds, "SOPClassUID"))
            n_frames = _int(_get(ds, "NumberOfFrames")) or 1
            if sop_class in MULTIFRAME_CT_SOP_CLASSES or n_frames > 1:
                slices.extend(_multi_frame(ds, path.name))
            else:
                # write the HU straight into one preallocated volume (no per-slice array, no stacking)
                if block is None:
                    block = np.empty((len(paths), int(ds.Rows), int(ds.Columns)), dtype=np.float32)
                slices.append(_single_frame(ds, path.name, block[n_block], n_block))
                n_block += 1
        except SeriesSkipped as exc:
            # a localizer or a non-image object inside an otherwise axial CT series is left out;
            # the series is skipped only when nothing usable remains
            ignored.append(str(exc))
            continue
        if first_ds is None:
            first_ds = ds
    if not slices:
        reasons = sorted(set(ignored))
        raise SeriesSkipped(reasons[0] if len(reasons) == 1 else "; ".join(reasons))
    if ignored:
        log.warning("%d of %d files of the series left out (%s)", len(ignored), len(paths),
                    "; ".join(sorted(set(ignored))))
    shapes = {s.hu.shape for s in slices}
    if len(shapes) != 1:
        raise SeriesSkipped(f"slices have different matrix sizes {sorted(shapes)}")
    spacings = {s.spacing for s in slices if s.spacing is not None}
    if not spacings:
        raise ValueError("No PixelSpacing in the series: cannot measure sizes in mm")
    ref_sp = next(iter(spacings))
    for sp in spacings:
        if abs(sp[0] - ref_sp[0]) > 1e-3 * ref_sp[0] or abs(sp[1] - ref_sp[1]) > 1e-3 * ref_sp[1]:
            raise SeriesSkipped(f"slices have different pixel spacings {sorted(spacings)}")
    if ref_sp[0] <= 0 or ref_sp[1] <= 0:
        raise ValueError(f"PixelSpacing must be positive, got {ref_sp}")

    meta = _series_meta(first_ds)  # type: ignore[arg-type]  # paths is non-empty
    ordered, positions = _sort(slices, meta)
    if block is not None and len(ordered) == n_block and all(s.block_index is not None for s in ordered):
        hu = _permute_rows(block[:n_block], [int(s.block_index) for s in ordered])  # type: ignore[arg-type]
    else:
        hu = np.stack([s.hu for s in ordered]).astype(np.float32, copy=False)
    check_plausible_hu(hu, [s.sop_instance_uid for s in ordered])
    thicknesses = [s.thickness for s in ordered if s.thickness is not None]
    thickness = float(np.median(thicknesses)) if thicknesses else None
    meta["slice_thickness_mm"] = thickness
    if len(positions) > 1:
        steps = np.diff(positions)
        meta["slice_spacing_mm"] = float(np.median(steps))
        meta["uneven_spacing"] = bool(np.max(steps) - np.min(steps) > 0.01 + 0.01 * abs(np.median(steps)))
        meta["duplicate_positions"] = bool(np.any(np.abs(steps) < 1e-3))
        extent = float(positions[-1] - positions[0])
    else:
        meta["slice_spacing_mm"] = None
        meta["uneven_spacing"] = False
        meta["duplicate_positions"] = False
        extent = 0.0
    # scan length: from the first to the last slice centre plus one slice thickness
    meta["scan_length_mm"] = extent + (thickness if thickness is not None else 0.0)
    meta["n_files"] = len(paths)
    meta["ignored_files"] = len(ignored)
    meta["ignored_reasons"] = "; ".join(sorted(set(ignored))) or None
    meta["spacing_note"] = _spacing_note(steps, len(ordered)) if meta["uneven_spacing"] else None
    if meta["uneven_spacing"]:
        log.warning("series has uneven slice spacing (%.3f to %.3f mm)", float(np.min(steps)), float(np.max(steps)))
    return CTVolume(
        hu=hu,
        pixel_spacing_mm=(float(ref_sp[0]), float(ref_sp[1])),
        slice_positions_mm=np.asarray(positions, dtype=np.float64),
        sop_instance_uids=[s.sop_instance_uid for s in ordered],
        frame_numbers=[s.frame_number for s in ordered],
        sop_class_uids=[s.sop_class_uid for s in ordered],
        ctdivol_mgy=np.asarray([s.ctdivol for s in ordered], dtype=np.float64),
        headers=[s.header for s in ordered],
        meta=meta,
    )
