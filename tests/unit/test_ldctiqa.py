"""LDCTIQA: checkpoint compatibility with ldct-benchmark's MultiHeadSwin, preprocessing, scores, weights.

The reference is torchvision's own ``torchvision/models/swin_transformer.py`` (pure Python), loaded
from the installed wheel with torchvision's package ``__init__`` (compiled ops) bypassed, and wrapped
exactly like ldct-benchmark's ``MultiHeadSwin`` (``swin_t(weights=None)``, ``head = Identity``, four
``Linear(768, 21)`` heads, mean over the heads of the softmax). The Makefile's venv target installs
torchvision with ``--no-deps`` for this; where it is absent the committed golden file
``tests/data/ldctiqa_golden.npz`` (written by the reference: ``python -m tests.unit.test_ldctiqa
--write-golden``) stands in, so the equivalence is always checked.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from analysis import ldctiqa
from analysis.ldctiqa import (
    CLASS_SCORES,
    MultiHeadSwin,
    WeightsNotInstalled,
    apply_center_width,
    load_weights,
    predict,
    preprocess,
    score_series,
    scores_from_probabilities,
    select_slices,
)
from storage.filestore import sha256_file
from tests.helpers import PHANTOM_5MM, WG04, require

torch.set_num_threads(1)

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "ldctiqa_golden.npz"
SEED = 20231008
SLICES = ("wg04/CT1_UNC", "wg04/CT2_UNC", "philips_head_phantom/S2010_5mm/I10")


# ------------------------------------------------------------------------- the reference
def _load_reference_module():
    """torchvision.models.swin_transformer from the installed wheel, without running torchvision's
    __init__ (it loads compiled ops that do not match this torch). Its own pure-Python dependencies
    (ops/misc.py, ops/stochastic_depth.py, models/_api.py, _meta.py, _utils.py) are loaded as they are;
    only ``utils._log_api_usage_once``/``_make_ntuple`` (usage logging, tuple helper) and the weights'
    preset transforms (metadata of pretrained weights, unused) are stubbed."""
    spec = importlib.util.find_spec("torchvision")  # finds the folder; does not import the package
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    if not (root / "models" / "swin_transformer.py").is_file():
        return None
    pkg = "_tvref"  # a private name: the real `torchvision` stays unimported for everything else
    if f"{pkg}.models.swin_transformer" in sys.modules:
        return sys.modules[f"{pkg}.models.swin_transformer"]

    def package(name: str, path: Path) -> None:
        m = types.ModuleType(name)
        m.__path__ = [str(path)]
        sys.modules[name] = m

    def real(name: str, path: Path):
        s = importlib.util.spec_from_file_location(name, path)
        m = importlib.util.module_from_spec(s)
        sys.modules[name] = m
        s.loader.exec_module(m)
        return m

    package(pkg, root)
    package(f"{pkg}.ops", root / "ops")
    package(f"{pkg}.models", root / "models")
    package(f"{pkg}.transforms", root / "transforms")
    utils = types.ModuleType(f"{pkg}.utils")
    utils._log_api_usage_once = lambda obj: None
    utils._make_ntuple = lambda x, n: tuple(x) if isinstance(x, (list, tuple)) else (x,) * n
    sys.modules[f"{pkg}.utils"] = utils
    presets = types.ModuleType(f"{pkg}.transforms._presets")
    presets.ImageClassification = object
    presets.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear")
    sys.modules[f"{pkg}.transforms._presets"] = presets
    real(f"{pkg}._internally_replaced_utils", root / "_internally_replaced_utils.py")
    real(f"{pkg}._utils", root / "_utils.py")
    real(f"{pkg}.ops.misc", root / "ops" / "misc.py")
    real(f"{pkg}.ops.stochastic_depth", root / "ops" / "stochastic_depth.py")
    real(f"{pkg}.models._api", root / "models" / "_api.py")
    real(f"{pkg}.models._meta", root / "models" / "_meta.py")
    real(f"{pkg}.models._utils", root / "models" / "_utils.py")
    return real(f"{pkg}.models.swin_transformer", root / "models" / "swin_transformer.py")


class ReferenceMultiHeadSwin(nn.Module):
    """ldct-benchmark's MultiHeadSwin around torchvision's swin_t."""

    def __init__(self, swin_module, num_classes: int = 21, num_heads: int = 4) -> None:
        super().__init__()
        self.num_classes, self.num_heads = num_classes, num_heads
        self.model = swin_module.swin_t(weights=None)
        num_ftrs = self.model.head.in_features
        self.model.head = nn.Identity()
        self.heads = nn.ModuleList([nn.Linear(num_ftrs, num_classes) for _ in range(num_heads)])

    def forward(self, x):
        x = self.model(x)
        logits = torch.stack([self.heads[i](x) for i in range(self.num_heads)], dim=-2)
        return torch.mean(logits.softmax(dim=-1), dim=-2)


def seeded_state(template: dict[str, torch.Tensor], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Deterministic random weights for every key (numpy's generator, stable across versions), scaled
    so that every part matters: LayerNorm gains 1 +- 0.1, biases +- 0.05, relative position bias
    tables SD 0.5 (so the window geometry and the shift mask show in the output), linear/conv weights
    1/sqrt(fan-in), head weights 4/sqrt(768) (peaked, distinct class probabilities)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k in sorted(template):
        v = template[k]
        if k.endswith("relative_position_index"):
            out[k] = v.clone()
            continue
        shape = tuple(v.shape)
        z = rng.standard_normal(shape)
        if k.endswith("relative_position_bias_table"):
            w = 0.5 * z
        elif k.endswith(".bias"):
            w = 0.05 * z
        elif v.ndim == 1:  # LayerNorm weight
            w = 1.0 + 0.1 * z
        else:
            fan_in = int(np.prod(shape[1:]))
            w = (4.0 if k.startswith("heads.") else 1.0) * z / np.sqrt(fan_in)
        out[k] = torch.from_numpy(w.astype(np.float32))
    return out


def real_slices() -> np.ndarray:
    from analysis.volume import load_series

    paths = [require(WG04 / "CT1_UNC"), require(WG04 / "CT2_UNC"), require(PHANTOM_5MM / "I10")]
    return np.stack([load_series([p]).hu[0] for p in paths])


REF = _load_reference_module()
needs_reference = pytest.mark.skipif(REF is None, reason="torchvision's swin_transformer.py is not installed "
                                     "(make venv installs it with --no-deps); the golden-file test covers this")


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    """The reference model with seeded weights, saved in the published format; (path, net)."""
    torch.manual_seed(0)
    ref = ReferenceMultiHeadSwin(REF).eval()
    ref.load_state_dict(seeded_state(ref.state_dict()), strict=True)
    path = tmp_path_factory.mktemp("ldctiqa") / "ldct-iqa-seeded.pt"
    torch.save({"model_state_dict": ref.state_dict()}, path)
    return path, ref


# ---------------------------------------------------------------------- key list / shapes
@needs_reference
def test_state_dict_keys_and_shapes_equal_the_reference() -> None:
    ref = ReferenceMultiHeadSwin(REF).state_dict()
    ours = MultiHeadSwin().state_dict()
    assert list(ours) == list(ref)  # same keys in the same order
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in ref.items()}
    assert len(ours) == 191 and ours["heads.3.weight"].shape == (21, 768)
    idx = "model.features.5.3.attn.relative_position_index"
    assert torch.equal(ours[idx], ref[idx])  # persistent buffer, same values
    assert "model.head.weight" not in ours


def test_state_dict_keys_and_shapes_equal_the_golden_record() -> None:
    g = np.load(GOLDEN)
    ours = MultiHeadSwin().state_dict()
    assert list(ours) == [str(k) for k in g["keys"]]
    assert [list(v.shape) for v in ours.values()] == [[int(d) for d in s if d >= 0] for s in g["shapes"]]


# ------------------------------------------------------------------------------ equivalence
@needs_reference
def test_published_format_loads_strictly_and_outputs_equal_the_reference(reference_checkpoint) -> None:
    path, ref = reference_checkpoint
    loaded = load_weights(path)
    assert loaded.sha256 == sha256_file(path) and not loaded.published
    x, resampled = preprocess(real_slices())
    assert not resampled
    feats = {}
    hooks = [ref.model.register_forward_hook(lambda m, i, o: feats.__setitem__("ref", o.numpy())),
             loaded.net.model.register_forward_hook(lambda m, i, o: feats.__setitem__("ours", o.numpy()))]
    try:
        with torch.inference_mode():
            p_ref = ref(x).double().numpy()
            p_ours = loaded.net(x).double().numpy()
    finally:
        for h in hooks:
            h.remove()
    f_ref, f_ours = feats["ref"], feats["ours"]
    assert f_ref.shape == (3, 768)
    assert p_ref.shape == (3, 21)
    assert np.abs(p_ours - p_ref).max() < 1e-5
    assert np.abs(f_ours - f_ref).max() < 1e-3 * np.abs(f_ref).max()
    # the weights are not degenerate: the three slices get different, non-uniform probabilities
    assert p_ref.max() > 0.15 and np.abs(p_ref[0] - p_ref[1]).max() > 0.01
    # the test can fail: the same weights without the shifted windows are far from the reference
    unshifted = MultiHeadSwin().eval()
    unshifted.load_state_dict(loaded.net.state_dict())
    for m in unshifted.modules():
        if isinstance(m, ldctiqa.WindowAttention):
            m.shift = 0
    with torch.inference_mode():
        assert np.abs(unshifted(x[:1]).double().numpy() - p_ref[:1]).max() > 1e-3


def test_outputs_equal_the_golden_reference_outputs() -> None:
    """Without torchvision: the same seeded weights in ours give the reference's recorded outputs."""
    g = np.load(GOLDEN)
    assert int(g["seed"]) == SEED and [str(s) for s in g["slices"]] == list(SLICES)
    net = MultiHeadSwin().eval()
    net.load_state_dict(seeded_state(net.state_dict(), int(g["seed"])), strict=True)
    probs, resampled = predict(net, real_slices(), batch_size=3)
    assert not resampled
    assert np.abs(probs - g["probabilities"]).max() < 1e-5
    s, e = scores_from_probabilities(g["probabilities"])
    assert np.allclose(s, g["score"]) and np.allclose(e, g["expected_score"])


# ---------------------------------------------------------------------------- preprocessing
def test_window_matches_ldctbench_apply_center_width_with_its_half_offsets() -> None:
    # centre 724 / width 1400 on HU + 1024: lower = 723.5 - 699.5 = 24, upper = 1423,
    # value = (x - 723.5) / 1399 + 0.5 = (HU + 1000) / 1399
    hu = np.array([-2000.0, -1024.0, -1000.0, -999.0, 0.0, 398.0, 399.0, 400.0, 3000.0], np.float32)
    got = apply_center_width(hu + 1024.0)
    want = np.array([0.0, 0.0, 0.0, 1 / 1399, 1000 / 1399, 1398 / 1399, 1.0, 1.0, 1.0])
    assert np.abs(got - want).max() < 1e-6
    assert got.dtype == np.float32
    # without the -0.5 offsets (x - 24) / 1400 would give 0 HU -> 0.714286, not 0.714796
    assert abs(got[4] - 1000 / 1400) > 4e-4


def test_preprocess_normalises_each_channel_with_imagenet_statistics() -> None:
    hu = np.zeros((2, 512, 512), np.float32)
    hu[0, :, :256] = -1000.0  # left half air, right half water
    hu[1] = 399.0
    x, resampled = preprocess(hu)
    assert not resampled and x.shape == (2, 3, 512, 512) and x.dtype == torch.float32
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for c in range(3):
        assert x[0, c, 10, 10].item() == pytest.approx((0.0 - mean[c]) / std[c], abs=1e-6)
        assert x[0, c, 10, 400].item() == pytest.approx((1000 / 1399 - mean[c]) / std[c], abs=1e-6)
        assert x[1, c, 300, 300].item() == pytest.approx((1.0 - mean[c]) / std[c], abs=1e-6)
    assert x[0, 0, 10, 10].item() == pytest.approx(-2.1179039, abs=1e-6)


def test_other_matrices_are_resampled_to_512_and_flagged() -> None:
    hu = np.full((1, 256, 256), -1000.0, np.float32)
    hu[:, :, 128:] = 0.0
    x, resampled = preprocess(hu)
    assert resampled and x.shape == (1, 3, 512, 512)
    v = x[0, 0] * 0.229 + 0.485  # back to the [0, 1] window
    assert v[100, 50].item() == pytest.approx(0.0, abs=1e-6)
    assert v[100, 450].item() == pytest.approx(1000 / 1399, abs=1e-6)
    # 768 x 1024 (non-square): padded with air to 1024 x 1024 (centred), then shrunk; water stays water
    big = np.zeros((1, 768, 1024), np.float32)
    x, resampled = preprocess(big)
    v = x[0, 0] * 0.229 + 0.485
    assert resampled and x.shape == (1, 3, 512, 512)
    assert v[10, 256].item() == pytest.approx(0.0, abs=1e-6)  # padded rows: air
    assert v[256, 256].item() == pytest.approx(1000 / 1399, abs=1e-5)


# ---------------------------------------------------------------------------------- scores
def test_score_and_expected_score_from_known_probabilities() -> None:
    p = np.zeros((3, 21))
    p[0, 10] = 1.0  # certain 2.0
    p[1, 0] = p[1, 20] = 0.5  # a tie: argmax takes the first class (as torch.argmax does)
    p[2, 5], p[2, 15], p[2, 16] = 0.1, 0.6, 0.3
    score, expected = scores_from_probabilities(p)
    assert score.tolist() == [2.0, 0.0, 3.0]
    assert expected == pytest.approx([2.0, 2.0, 0.1 * 1.0 + 0.6 * 3.0 + 0.3 * 3.2])
    assert CLASS_SCORES[-1] == 4.0 and CLASS_SCORES[1] == pytest.approx(0.2)
    assert int(torch.argmax(torch.tensor(p[1]))) == 0


class _WindowToClass(nn.Module):
    """Stand-in network: one-hot at class round(20 * window value) of the slice's centre pixel."""

    def forward(self, x):
        v = x[:, 0, 256, 256] * 0.229 + 0.485
        k = torch.round(v * 20).long().clamp(0, 20)
        return torch.nn.functional.one_hot(k, 21).float()


def test_series_scores_are_means_over_an_evenly_spaced_subset() -> None:
    ks = np.array([0, 3, 5, 10, 12, 18, 20])
    hu = np.stack([np.full((512, 512), -1000.0 + 1399.0 * k / 20, np.float32) for k in ks])
    r = score_series(_WindowToClass(), hu, max_slices=4, batch_size=3)
    assert r.indices.tolist() == [0, 2, 4, 6] == select_slices(7, 4).tolist()
    want = ks[[0, 2, 4, 6]] / 5.0  # 0.0, 1.0, 2.4, 4.0
    assert np.allclose(r.slice_score[r.indices], want) and np.isnan(r.slice_score[[1, 3, 5]]).all()
    assert np.allclose(r.slice_expected_score[r.indices], want)  # one-hot: expected = argmax score
    assert r.series_score == pytest.approx(want.mean()) and r.series_expected_score == pytest.approx(want.mean())
    assert not r.resampled and r.matrix == (512, 512)
    assert score_series(_WindowToClass(), hu, max_slices=0).indices.tolist() == list(range(7))


# ---------------------------------------------------------------------------------- weights
def test_missing_weights_raise_not_installed_with_the_reason(tmp_path) -> None:
    with pytest.raises(WeightsNotInstalled, match=r"^LDCTIQA weights not installed: see analysis/weights/LDCTIQA_MODEL_CARD.md"):
        load_weights(tmp_path / "ldct-iqa.pt")
    with pytest.raises(WeightsNotInstalled, match="not installed"):
        load_weights(None)
    assert issubclass(WeightsNotInstalled, FileNotFoundError)


def test_foreign_files_are_a_clear_value_error(tmp_path) -> None:
    bad = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="not an LDCTIQA checkpoint"):
        load_weights(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot be read"):
        load_weights(junk)
    sd = MultiHeadSwin().state_dict()
    sd["heads.0.weight"] = torch.zeros(5, 768)  # a 5-class head: not the published architecture
    wrong = tmp_path / "wrong.pt"
    torch.save({"model_state_dict": sd}, wrong)
    with pytest.raises(ValueError, match="does not fit the LDCTIQA"):
        load_weights(wrong)


def test_checksum_published_is_silent_other_warns_once(tmp_path, caplog, monkeypatch) -> None:
    net = MultiHeadSwin()
    net.load_state_dict(seeded_state(net.state_dict(), 1))
    path = tmp_path / "site-finetuned.pt"
    torch.save({"model_state_dict": net.state_dict(), "epoch": 3}, path)
    sha = sha256_file(path)
    with caplog.at_level(logging.WARNING, logger="analysis.ldctiqa"):
        a = load_weights(path)
        b = load_weights(path)  # cached: same object, no second warning
    assert a is b and a.sha256 == sha and not a.published
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and sha in warnings[0].getMessage()
    for k, v in net.state_dict().items():
        assert torch.equal(a.net.state_dict()[k], v)

    copy = tmp_path / "ldct-iqa.pt"
    copy.write_bytes(path.read_bytes())
    monkeypatch.setattr(ldctiqa, "PUBLISHED_SHA256", sha)  # pretend this file is the published one
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="analysis.ldctiqa"):
        c = load_weights(copy)
    assert c.published and c.sha256 == sha and not caplog.records


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_autocast_agrees_with_cpu() -> None:
    net = MultiHeadSwin().eval()
    net.load_state_dict(seeded_state(net.state_dict()))
    hu = real_slices()
    p_cpu, _ = predict(net, hu, "cpu")
    p_gpu, _ = predict(net.to("cuda"), hu, "cuda")
    assert np.abs(p_gpu - p_cpu).max() < 2e-2
    assert np.array_equal(p_gpu.argmax(1), p_cpu.argmax(1))


# ------------------------------------------------------------------------------ golden file
def write_golden() -> None:
    """Run the reference (torchvision's swin_transformer.py) once and record what the tests need."""
    assert REF is not None, "torchvision's swin_transformer.py is needed to write the golden file"
    torch.manual_seed(0)
    ref = ReferenceMultiHeadSwin(REF).eval()
    ref.load_state_dict(seeded_state(ref.state_dict()), strict=True)
    x, _ = preprocess(real_slices())
    with torch.inference_mode():
        probs = ref(x).double().numpy()
    s, e = scores_from_probabilities(probs)
    sd = ref.state_dict()
    shapes = np.full((len(sd), 4), -1, np.int64)
    for i, v in enumerate(sd.values()):
        shapes[i, : v.ndim] = v.shape
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(GOLDEN, seed=np.int64(SEED), slices=np.array(SLICES), probabilities=probs,
                        score=s, expected_score=e, keys=np.array(list(sd)), shapes=shapes,
                        torchvision_file=np.array("torchvision 0.28.0 models/swin_transformer.py"))
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes); probabilities max {probs.max(1)}")


if __name__ == "__main__":
    if "--write-golden" in sys.argv:
        write_golden()
