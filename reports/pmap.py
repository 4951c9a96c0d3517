"""Parametric Map (highdicom) of a pixel-wise map over an analysed series.

One unsigned 16-bit frame per source slice (or per frame of a multi-frame source), in the source's
Frame of Reference, at the resolution the map really has (``downsample``: block means, Pixel Spacing
scaled, plane positions at the block centres); each frame references its source image (Derivation
Image / Source Image Sequence). highdicom may store the frames in spatial order rather than input
order; the per-frame references always pair a frame with its source. The Real World Value Mapping
(slope, intercept over min..max of the map) gives the real values, with the map's UCUM unit and its
quantity code (``reports.codes.MAPS``); Window Center/Width (stored values) show the 1st-99th
percentile. Provenance: the algorithm goes into the Contributing Equipment
Sequence (model name = algorithm name, software version = algorithm version, contribution
description = weights SHA-256) and into Content Description.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.pm import ParametricMap, RealWorldValueMapping
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes as pydicom_codes

from reports.codes import BODY_PARTS, map_code
from reports.common import (
    _shallow_copy, is_multiframe, n_frames, new_instance_arguments, no_person_name_warnings, prepare_sources,
)
from reports.inputs import AlgorithmId, DeviceInfo

logger = logging.getLogger(__name__)


def _source_frame_count(sources: Sequence[Dataset]) -> tuple[int, bool]:
    """(number of frames the map must have, whether the source is one multi-frame image)."""
    if len(sources) == 1 and is_multiframe(sources[0]):
        return n_frames(sources[0]), True
    multi = [str(ds.SOPInstanceUID) for ds in sources if is_multiframe(ds) and n_frames(ds) > 1]
    if multi:
        raise ValueError(
            'Argument "source_images" mixes several images with a multi-frame one '
            f"({len(sources)} images): give either single-frame slices or one multi-frame image"
        )
    return len(sources), False


def _frame_order(frame_numbers: Sequence[int | None] | None, n: int) -> np.ndarray | None:
    if frame_numbers is None or all(f is None for f in frame_numbers):
        return None
    if len(frame_numbers) != n or any(f is None for f in frame_numbers):
        raise ValueError(
            f'Argument "frame_numbers" must give one frame number per map slice ({n}), got {frame_numbers!r}'
        )
    order = np.asarray(frame_numbers, dtype=int) - 1
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError(f'Argument "frame_numbers" must be a permutation of 1..{n}, got {list(frame_numbers)!r}')
    return order


class MapNotPossible(ValueError):
    """The source lacks what the Parametric Map IOD requires (e.g. a Frame of Reference)."""


def _fg_value(ds: Dataset, sequence: str, keyword: str, frame: int = 0):
    """``keyword`` of functional group ``sequence`` for frame ``frame`` (per-frame, else shared), or None."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and frame < len(per):
        for item in per[frame].get(sequence, [])[:1]:
            if keyword in item:
                return item[keyword].value
    for group in ds.get("SharedFunctionalGroupsSequence", [])[:1]:
        for item in group.get(sequence, [])[:1]:
            if keyword in item:
                return item[keyword].value
    return None


def _geometry(src: Dataset, frame: int | None) -> tuple[np.ndarray, np.ndarray, tuple[float, float], float | None]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness) of one source
    slice: a single-frame image (``frame`` None) or frame ``frame`` (0-based) of a multi-frame one."""
    if frame is None:
        ipp, iop, ps, st = (src.get(k) for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                                                 "SliceThickness"))
    else:
        ipp = _fg_value(src, "PlanePositionSequence", "ImagePositionPatient", frame)
        iop = _fg_value(src, "PlaneOrientationSequence", "ImageOrientationPatient", frame)
        ps = _fg_value(src, "PixelMeasuresSequence", "PixelSpacing", frame)
        st = _fg_value(src, "PixelMeasuresSequence", "SliceThickness", frame)
    if ipp is None or iop is None or ps is None or len(ipp) != 3 or len(iop) != 6 or len(ps) != 2:
        raise MapNotPossible("the source slices have no complete plane geometry (ImagePositionPatient, "
                             "ImageOrientationPatient, PixelSpacing): a Parametric Map needs one")
    thickness = float(st) if st not in (None, "") else None
    return (np.array([float(x) for x in ipp]), np.array([float(x) for x in iop]),
            (float(ps[0]), float(ps[1])), thickness)


def block_mean(values: np.ndarray, factor: int) -> np.ndarray:
    """(n, rows, cols) -> (n, rows/factor, cols/factor): the mean of each factor x factor block."""
    if factor == 1:
        return values
    n, r, c = values.shape
    if r % factor or c % factor:
        raise ValueError(f'Argument "downsample" ({factor}) must divide the matrix {r} x {c}')
    return values.reshape(n, r // factor, factor, c // factor, factor).mean(axis=(2, 4), dtype=np.float64).astype(
        np.float32)


def quantise(pixels: np.ndarray) -> tuple[np.ndarray, float, float]:
    """float32 -> (uint16 stored values, slope, intercept) with value = stored * slope + intercept.

    The full 0..65535 range spans min..max, so the quantisation step is (max - min) / 65535 and a
    value read back through the mapping is within half a step of the input."""
    lo, hi = float(pixels.min()), float(pixels.max())
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.clip(np.rint((pixels.astype(np.float64) - lo) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, lo


def build_parametric_map(
    source_images: Sequence[Dataset],
    values: np.ndarray,
    *,
    name: str,
    label: str,
    unit_code: str,
    unit_meaning: str,
    algorithm: AlgorithmId,
    series_number: int,
    instance_number: int = 1,
    frame_numbers: Sequence[int | None] | None = None,
    fill_value: float | None = None,
    window: tuple[float, float] | None = None,
    downsample: int = 1,
    resolution_note: str | None = None,
    series_description: str | None = None,
    device: DeviceInfo | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> ParametricMap:
    """Build an unsigned 16-bit Parametric Map of ``values`` (n, rows, cols) over ``source_images``.

    ``source_images``: the analysed headers (PixelData may be absent), either n single-frame images
    in the order of ``values`` or one multi-frame image (repeated per frame, as a ``CTVolume`` holds
    it, is fine). For a multi-frame source, ``frame_numbers`` (1-based, one per map slice, e.g.
    ``CTVolume.frame_numbers``) says which frame each map slice belongs to; without it map slice i
    is frame i+1. ``name``: map key (``reports.codes.MAPS`` gives its quantity code; another name
    is a ValueError). ``unit_code``/``unit_meaning``: UCUM unit. ``fill_value``: what to write for
    non-finite pixels; with None, non-finite pixels are an error. ``window``: (center, width) in the
    map's unit for display; default the 1st-99th percentile.

    ``downsample``: the map is stored at 1/``downsample`` of the source matrix (the mean of each
    ``downsample`` x ``downsample`` block), i.e. at the resolution it really has; Pixel Spacing is
    multiplied by it and each frame's Image Position is the centre of its first block, so the frame
    covers exactly its source slice. The pixels are uint16 with a Real World Value Mapping
    (slope, intercept) from min..max of the map: values read back through it are within half a
    quantisation step ((max - min) / 65535) of the (block-averaged) input. A source without a Frame
    of Reference raises ``MapNotPossible`` (the IOD requires one).
    """
    if not isinstance(series_number, int) or series_number < 1:
        raise ValueError(f'Argument "series_number" must be a positive int, got {series_number!r}')
    if not isinstance(values, np.ndarray) or values.dtype != np.float32 or values.ndim != 3:
        raise ValueError(
            'Argument "values" must be a float32 numpy array (n_slices, rows, cols), got '
            f"{type(values).__name__} {getattr(values, 'dtype', None)} {getattr(values, 'shape', None)}"
        )
    if not label or len(label) > 64:
        raise ValueError(f'Argument "label" must be 1-64 characters, got {label!r}')
    if not unit_code or not unit_meaning:
        raise ValueError(f'Arguments "unit_code" and "unit_meaning" must be given, got {unit_code!r}, {unit_meaning!r}')
    if not isinstance(downsample, int) or downsample < 1:
        raise ValueError(f'Argument "downsample" must be a positive int, got {downsample!r}')
    quantity = map_code(name).quantity
    device = device or DeviceInfo()
    sources = prepare_sources(source_images)
    if any(not str(ds.get("FrameOfReferenceUID", "") or "").strip() for ds in sources):
        raise MapNotPossible("the source has no FrameOfReferenceUID: a Parametric Map needs a Frame of Reference")
    n_expected, multiframe = _source_frame_count(sources)
    if values.shape[0] != n_expected:
        raise ValueError(
            f'Argument "values" has {values.shape[0]} slices, the source has {n_expected} '
            f"{'frames' if multiframe else 'images'}: one map slice per source slice is required"
        )
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if values.shape[1:] != (rows, cols):
        raise ValueError(f'Argument "values" slices are {values.shape[1:]}, the source images are {(rows, cols)}')
    if not multiframe and frame_numbers is not None and any(f is not None for f in frame_numbers):
        raise ValueError('Argument "frame_numbers" is only for a multi-frame source; the source is single-frame')
    order = _frame_order(frame_numbers, n_expected) if multiframe else None

    pixels = values
    bad = ~np.isfinite(pixels)
    if bad.any():
        if fill_value is None or not np.isfinite(fill_value):
            raise ValueError(
                f'Argument "values" holds {int(bad.sum())} non-finite pixels; pass a finite "fill_value" '
                f"to write in their place (got fill_value={fill_value!r})"
            )
        pixels = np.where(bad, np.float32(fill_value), pixels).astype(np.float32)
        logger.info("parametric map %s: %d non-finite pixels written as %g", name, int(bad.sum()), fill_value)
    if order is not None:
        framed = np.empty_like(pixels)
        framed[order] = pixels
        pixels = framed
    pixels = block_mean(np.ascontiguousarray(pixels, dtype=np.float32), downsample)

    if window is None:
        p1, p99 = (float(v) for v in np.percentile(pixels, [1, 99]))
        window = ((p1 + p99) / 2.0, max(p99 - p1, 1e-3))
    center, width = float(window[0]), float(window[1])
    if not width > 0:
        raise ValueError(f'Argument "window" width must be > 0, got {window!r}')
    stored, slope, intercept = quantise(pixels)

    geometry = {}
    if downsample > 1:
        f = downsample
        planes = []
        iop0 = ps0 = th0 = None
        for k in range(n_expected):
            ipp, iop, ps, th = _geometry(sources[0] if multiframe else sources[k], k if multiframe else None)
            iop0, ps0 = (iop if iop0 is None else iop0), (ps if ps0 is None else ps0)
            th0 = th if th0 is None else th0
            # centre of the first f x f block: (f - 1) / 2 source pixels along the row and column
            shift = (f - 1) / 2.0 * (ps[1] * iop[:3] + ps[0] * iop[3:])
            planes.append(hd.PlanePositionSequence("PATIENT", image_position=[float(x) for x in ipp + shift]))
        geometry = dict(
            plane_positions=planes,
            plane_orientation=hd.PlaneOrientationSequence("PATIENT", image_orientation=[float(x) for x in iop0]),
            pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=[ps0[0] * f, ps0[1] * f], slice_thickness=th0),
        )
    if not multiframe and "SliceThickness" not in sources[0]:
        # highdicom reads the first source's Slice Thickness (Type 2, left out by some writers): a
        # copy of that header with it empty gives the map's Pixel Measures no thickness
        first = _shallow_copy(sources[0])  # (Dataset(ds) and copy.copy share the source's elements)
        first.SliceThickness = None
        sources = [first, *sources[1:]]

    unit = CodedConcept(unit_code, "UCUM", unit_meaning)
    rwvm = RealWorldValueMapping(
        lut_label=name[:16],
        lut_explanation=label,
        unit=unit,
        value_range=(int(stored.min()), int(stored.max())),
        slope=float(slope),
        intercept=float(intercept),
        quantity_definition=CodedConcept(quantity.value, quantity.scheme_designator, quantity.meaning),
    )
    provenance = hd.ContributingEquipment(
        manufacturer=device.manufacturer,
        purpose_of_reference=pydicom_codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=device.device_serial_number,
        contribution_description=(
            f"{algorithm.name} {algorithm.version}"
            + (f" weights_sha256={algorithm.weights_sha256}" if algorithm.weights_sha256 else " (no learned weights)")
        ),
    )
    # the window in stored values (the VOI LUT applies to stored pixels of a Parametric Map)
    w_center, w_width = (center - intercept) / slope, max(width / slope, 1.0)
    with no_person_name_warnings():
        pm = ParametricMap(
            source_images=sources,
            pixel_array=stored,
            **new_instance_arguments(device, series_instance_uid=series_instance_uid, series_number=series_number,
                                     sop_instance_uid=sop_instance_uid, instance_number=instance_number),
            contains_recognizable_visual_features=True,
            real_world_value_mappings=[rwvm],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=w_center, window_width=w_width)],
            content_label=_content_label(name),
            content_description=f"{label} ({algorithm.name} {algorithm.version})"[:64],
            contributing_equipment=[provenance],
            series_description=(series_description or f"QA map: {label}")[:64],
            **geometry,
        )
    _set_anatomy(pm, sources[0])
    if device.institution_name:
        pm.InstitutionName = device.institution_name
    if resolution_note:
        pm.ImageComments = resolution_note[:10240]
    logger.info("built parametric map %s (%s): %d frames of %d x %d", pm.SOPInstanceUID, name, stored.shape[0],
                stored.shape[1], stored.shape[2])
    return pm


def map_values(ds: Dataset) -> np.ndarray:
    """The real-world values of a Parametric Map written by ``build_parametric_map`` (float64)."""
    rwvm = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    return ds.pixel_array.astype(np.float64) * float(rwvm.RealWorldValueSlope) + float(rwvm.RealWorldValueIntercept)


def _frame_anatomy_of(src: Dataset) -> Dataset | None:
    """Frame Anatomy item for the map: the multi-frame source's own, else one made from Body Part
    Examined for an unpaired body part (or a paired one whose laterality the source states)."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in src.get(groups, [])[:1]:
            if group.get("FrameAnatomySequence"):
                return copy.deepcopy(group.FrameAnatomySequence[0])
    part = str(src.get("BodyPartExamined", "") or "").strip().upper()
    if part not in BODY_PARTS:
        return None
    region, paired = BODY_PARTS[part]
    side = str(src.get("ImageLaterality", "") or src.get("Laterality", "") or "").strip().upper()
    if paired and side not in ("R", "L", "B"):
        return None
    item = Dataset()
    code = Dataset()
    code.CodeValue = region.value
    code.CodingSchemeDesignator = region.scheme_designator
    code.CodeMeaning = region.meaning
    item.AnatomicRegionSequence = [code]
    item.FrameLaterality = side if paired else "U"
    return item


def _set_anatomy(pm: ParametricMap, src: Dataset) -> None:
    """Laterality (General Series, Type 2C) or Frame Anatomy: dciodvfy requires one of them.

    With a Frame Anatomy functional group the series-level Laterality is left out; without one
    (unknown body part) Laterality is written empty, i.e. unknown (dciodvfy then warns).
    """
    anatomy = _frame_anatomy_of(src)
    if anatomy is not None:
        pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
        if "Laterality" in pm:
            del pm.Laterality
    elif "Laterality" not in pm:
        pm.Laterality = src.get("Laterality") or None


def _content_label(name: str) -> str:
    """Content Label (CS, 16 chars, upper case letters, digits, space, underscore)."""
    out = "".join(c if c.isalnum() else "_" for c in name.upper())[:16]
    return out or "MAP"
