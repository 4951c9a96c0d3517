"""Coverage-guided fuzzing (atheris / libFuzzer) of the C-STORE validation path.

Input: one byte choosing the negotiated transfer syntax and the request's SOP class, then the encoded
dataset as it would arrive over DIMSE. It is spooled the way pynetdicom spools it (preamble, file meta,
dataset) and given to ``scp.ingest.read_instance_info`` with the request's SOP Instance UID ``2.25.1``
(every seed carries it). Properties checked on every input:

* the only outcomes are acceptance or one of the refusals the C-STORE handler maps to a status
  (InvalidUID, a missing attribute, a SOP Class mismatch, DatasetError / InstanceTooLarge); anything
  else (IndexError, RecursionError, MemoryError, ...) is a crash;
* an accepted instance is readable by pydicom to its end, and its Pixel Data gives the image it
  describes: native pixels decode to Frames x Rows x Columns, an encapsulated one splits into its frames.

Run: python tests/unit/fuzz_store_target.py CORPUS_DIR -max_total_time=30 (tests/unit/test_fuzz_store.py
makes the seed corpus from real slices and runs it).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import logging  # noqa: E402

import pydicom  # noqa: E402
from pydicom.encaps import generate_frames  # noqa: E402

import storage.db  # noqa: E402,F401  (imported first: only the two modules below are instrumented)
import storage.repo  # noqa: E402,F401
from storage.filestore import InvalidUID  # noqa: E402
from tests.crafted import file_meta  # noqa: E402

with atheris.instrument_imports():
    from scp import dataset_check
    from scp.ingest import _Mismatch, read_instance_info

SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.5"]
SOP_CLASSES = ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"]
REQUEST_UID = "2.25.1"
MAX_BYTES = 64 << 20  # the cap in the fuzzer: a bomb must be refused, not inflated to 2 GiB per input
SPOOL = Path(os.environ.get("CTQA_FUZZ_SPOOL") or tempfile.mkdtemp(prefix="ctqa-fuzz-"))  # the test passes its tmp dir
SPOOL.mkdir(parents=True, exist_ok=True)
META = {(ts, cls): file_meta(cls, REQUEST_UID, ts) for ts in SYNTAXES for cls in SOP_CLASSES}
EXPECTED = (InvalidUID, KeyError, _Mismatch, dataset_check.DatasetError)

warnings.simplefilter("ignore")
logging.disable(logging.CRITICAL)


def selector(ts: str, sop_class: str) -> int:
    return SYNTAXES.index(ts) + len(SYNTAXES) * SOP_CLASSES.index(sop_class)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    ts = SYNTAXES[data[0] % len(SYNTAXES)]
    sop_class = SOP_CLASSES[(data[0] // len(SYNTAXES)) % len(SOP_CLASSES)]
    path = SPOOL / "in.dcm"
    path.write_bytes(META[(ts, sop_class)] + data[1:])
    try:
        info = read_instance_info(path, affected_sop_class=sop_class, affected_sop_instance=REQUEST_UID,
                                  transfer_syntax=ts, max_bytes=MAX_BYTES)
    except EXPECTED:
        return
    # accepted: pydicom must read it to its end and find the image the walk described
    ds = pydicom.dcmread(path)
    frames = info.number_of_frames
    if ts == "1.2.840.10008.1.2.5":
        got = list(generate_frames(ds.PixelData, number_of_frames=frames))
        assert len(got) == frames, (len(got), frames)
    else:
        # raw: the stored samples as they are (pydicom's default YBR -> RGB conversion is float64 work
        # of ~17x the data: a 64 KiB deflated input of 64 MiB YBR_FULL_422 took 1.1 GB in the checker)
        ds.pixel_array_options(as_rgb=False)
        arr = ds.pixel_array
        shape = (frames, ds.Rows, ds.Columns) if frames > 1 else (ds.Rows, ds.Columns)
        assert arr.shape[: len(shape)] == shape, (arr.shape, shape)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
