"""Series -> HU volume.

CONTRACT (other modules build on these names; keep them):

    load_series(paths: Sequence[str | Path]) -> CTVolume
        Reads the files of ONE series (pydicom, pylibjpeg plugins for compressed syntaxes), sorts the
        slices along the slice normal, applies RescaleSlope/Intercept and PixelPaddingValue, and
        returns a CTVolume. Raises analysis.results.SeriesSkipped(reason) for a localizer, a non-axial
        or a non-CT series, and ValueError with a clear message for unreadable input.

    CTVolume (below).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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

    @property
    def header(self):
        """The first slice's header: patient, study, series and equipment modules."""
        return self.headers[0]

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])
