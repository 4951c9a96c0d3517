"""A few hundred seeded mutations of real slices sent over the wire to `qa-node serve` by a pynetdicom SCU
(the mutated bytes as they are, chunked send): the node answers each with a documented status, stays
up, keeps nothing it cannot read (every acknowledged instance reads back to its pixels with pydicom)
and serves a normal storescu push afterwards."""

from __future__ import annotations

import random
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames
from pydicom.uid import RLELossless

from tests.crafted import (
    BIG_ENDIAN, CT_IMAGE, DEFLATED, EXPLICIT, IMPLICIT, deflate, encode, nested_sequences, write_instance,
)
from tests.helpers import PHANTOM_5MM, SHARED_DATA, NodeProcess, node_status, require, storescu, write_config

pytestmark = pytest.mark.interop

RLE = "1.2.840.10008.1.2.5"
LEGACY = "1.2.840.10008.5.1.4.1.1.2.2"
DOCUMENTED = {0x0000, 0xA900, 0xC210, 0xC212, 0xC220, 0xC230}
N_MUTATIONS = 320


def seed_datasets() -> list[tuple[pydicom.Dataset, str]]:
    """Real slices: two full 512 x 512 phantom slices, 64 x 64 crops in every native syntax and RLE,
    and a real 3-frame Legacy Converted Enhanced CT."""
    out = []
    full = pydicom.dcmread(require(PHANTOM_5MM) / "I10")
    out += [(full, EXPLICIT), (pydicom.dcmread(require(PHANTOM_5MM) / "I20"), IMPLICIT)]
    crop = pydicom.dcmread(require(PHANTOM_5MM) / "I30")
    arr = np.ascontiguousarray(crop.pixel_array[224:288, 224:288])
    crop.Rows = crop.Columns = 64
    crop.PixelData = arr.tobytes()
    out += [(crop, EXPLICIT), (crop, BIG_ENDIAN), (crop, DEFLATED)]
    rle = pydicom.dcmread(require(PHANTOM_5MM) / "I40")
    rle.Rows = rle.Columns = 64
    rle.PixelData = arr.tobytes()
    rle.compress(RLELossless, arr, generate_instance_uid=False)
    out.append((rle, RLE))
    legacy = next((SHARED_DATA / "corpus" / "dcmqi" / "GE_LegacyConvertedEnhanced_tiny").glob("*.dcm"))
    out.append((pydicom.dcmread(legacy), EXPLICIT))
    return out


def mutate(rng: random.Random, body: bytes) -> bytes:
    """One to three random structural mutations of an encoded dataset."""
    b = bytearray(body)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(9)
        head = min(len(b), 2500)  # most of a slice's structure is in its first couple of KiB
        i = rng.randrange(max(1, head))
        if op == 0:  # flip bits
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(head)] ^= 1 << rng.randrange(8)
        elif op == 1:  # a length field (any aligned 2 or 4 bytes) set to something else
            fmt = rng.choice(["<H", "<I"])
            value = rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF if fmt == "<I" else 0xFFFE, rng.randrange(1 << 16)])
            j = i & ~1
            if j + struct.calcsize(fmt) <= len(b):
                b[j:j + struct.calcsize(fmt)] = struct.pack(fmt, value)
        elif op == 2:  # cut
            b = b[: rng.randrange(len(b))]
        elif op == 3:  # insert junk
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 4:  # delete a range
            del b[i:i + rng.randint(1, 64)]
        elif op == 5:  # duplicate a range
            b[i:i] = b[i:i + rng.randint(2, 200)]
        elif op == 6:  # deep nesting
            b[i:i] = nested_sequences(rng.choice([5, 40, 300]))
        elif op == 7:  # a byte in the pixels (a valid, different image)
            k = rng.randrange(len(b) // 2, len(b)) if len(b) > 2 else 0
            if b:
                b[k] = rng.randrange(256)
        else:  # a byte set to 0x00 or 0xFF in the header
            b[i] = rng.choice([0x00, 0xFF])
    return bytes(b)


def test_seeded_mutations_over_the_wire(tmp_path):
    from pynetdicom import AE, _config

    node = NodeProcess(write_config(tmp_path / "config.toml", data_dir=tmp_path / "var", stable_age_s=600), tmp_path)
    node.start()
    rng = random.Random(20261201)
    seeds = seed_datasets()
    files: list[Path] = []
    for n in range(N_MUTATIONS):
        ds, ts = seeds[n % len(seeds)]
        uid = f"2.25.7731{n}"
        ds.SOPInstanceUID = uid  # each mutation its own instance, so that nothing hides behind a duplicate
        if ts == DEFLATED:
            body = encode(ds, EXPLICIT)
            raw = deflate(mutate(rng, body)) if n % 3 else mutate(rng, deflate(body))
        else:
            raw = mutate(rng, encode(ds, EXPLICIT if ts == RLE else ts))
        files.append(write_instance(tmp_path / f"m{n}.dcm", raw, ts, str(ds.SOPClassUID), uid))

    ae = AE(ae_title="CT1")
    for sop_class in (CT_IMAGE, LEGACY):
        for ts in (EXPLICIT, IMPLICIT, BIG_ENDIAN, DEFLATED, RLE):
            ae.add_requested_context(sop_class, [ts])
    statuses: list[int | None] = []
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for start in range(0, len(files), 40):  # 40 instances per association
            assoc = ae.associate("127.0.0.1", node.port, ae_title="CTQA")
            assert assoc.is_established, f"association {start // 40} refused"
            for f in files[start:start + 40]:
                rsp = assoc.send_c_store(f)
                statuses.append(int(rsp.Status) if "Status" in rsp else None)
                assert assoc.is_established, f"association aborted after {f.name}"
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    counts = Counter(statuses)
    assert set(counts) <= DOCUMENTED, f"undocumented or missing statuses: {counts}"
    assert counts[0x0000] >= 30 and counts[0xC210] >= 100, counts  # both sides of the line exercised
    assert node.proc.poll() is None

    # everything acknowledged is on disk, indexed and reads back to the image it describes
    store = tmp_path / "var" / "store"
    kept = sorted(store.rglob("*.dcm"))
    by_uid = {p.stem: p for p in kept}
    acked = {files[i].stem for i, s in enumerate(statuses) if s == 0}
    assert len(kept) == len(acked)
    for p in kept:
        ds = pydicom.dcmread(p)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if ds.file_meta.TransferSyntaxUID == RLE:  # the fragment sequence is checked, the codestream decoded in analysis
            assert len(list(generate_frames(ds.PixelData, number_of_frames=frames))) == frames
        else:
            arr = ds.pixel_array
            assert arr.shape[-2:] == (ds.Rows, ds.Columns) and arr.size == frames * ds.Rows * ds.Columns, p
    st = node_status(node)
    assert sum(s["n_instances"] for s in st["series"]) == len(by_uid)
    assert not list((tmp_path / "var" / "spool").iterdir())
    log = node.log()
    assert "Traceback" not in log
    assert log.count("C-STORE refused") == sum(v for k, v in counts.items() if k != 0)

    # and a normal push afterwards
    r = storescu(node.port, require(PHANTOM_5MM) / "I100")
    assert r.returncode == 0, r.stderr
    uid = str(pydicom.dcmread(require(PHANTOM_5MM) / "I100", stop_before_pixels=True).SOPInstanceUID)
    got = next(store.rglob(f"{uid}.dcm"))
    np.testing.assert_array_equal(pydicom.dcmread(got).pixel_array,
                                  pydicom.dcmread(require(PHANTOM_5MM) / "I100").pixel_array)
    node.stop()
