"""Preprocessing (docs/original.md §5): format, normalisations, ZCA, the cache and augmentation."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from feedalign.preprocess import (
    NORMALIZATIONS,
    apply_zca,
    augment,
    cache_path,
    crop_flip_resize,
    fit_zca,
    pipeline,
    prepare,
    rgb2yuv,
)
from feedalign.preprocess.zca import zca_shapes


def correlated_images(n: int, seed: int = 0, shape=(3, 4, 4)) -> torch.Tensor:
    """uint8 images whose neighbouring pixels are correlated (a full-rank covariance)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand((n, *shape), generator=g) * 255
    mixed = 0.7 * base + 0.3 * base.roll(1, dims=-1) + 10 * torch.rand(n, 1, 1, 1, generator=g)
    return mixed.clamp(0, 255).round().to(torch.uint8)


def run(train, test, tmp_path, **kw):
    opts = {"dataset": "toy", "validate": False, "cache_dir": tmp_path} | kw
    return prepare(train, test, **opts)


# ------------------------------------------------------------ format


def test_rgb2yuv_bt601():
    rgb = torch.tensor([[255, 255, 255], [255, 0, 0], [0, 0, 255]], dtype=torch.uint8)
    yuv = rgb2yuv(rgb.T.reshape(1, 3, 3, 1))[0, :, :, 0].T  # (pixel, yuv)
    expected = torch.tensor(
        [
            [255.0, 0.0, 0.0],  # white: full luma, (almost) no chroma
            [0.299 * 255, -0.14713 * 255, 0.615 * 255],
            [0.114 * 255, 0.436 * 255, -0.10001 * 255],
        ]
    )
    assert torch.allclose(yuv, expected, atol=5e-3)  # the u row sums to 1e-5, not 0


def test_yuv_format_changes_colour_leaves_grey(tmp_path):
    colour = correlated_images(30)
    yuv, _ = run(colour, colour, tmp_path, format="yuv", normalization="simple")
    rgb, _ = run(colour, colour, tmp_path, format="rgb", normalization="simple")
    assert not torch.allclose(yuv, rgb)
    grey = correlated_images(30, shape=(1, 4, 4))
    a, _ = run(grey, grey, tmp_path, format="yuv")
    b, _ = run(grey, grey, tmp_path, format="rgb")
    assert torch.equal(a, b)


# ------------------------------------------------------------ normalisation


def test_normalizations_fit_on_train_apply_to_test(tmp_path):
    train, test = correlated_images(200, 1), correlated_images(50, 2)
    tr, te = train.double(), test.double()

    x, y = run(train, test, tmp_path, normalization="scale")
    lo, hi = tr.min(), tr.max()
    assert x.min() == 0 and x.max() == 1
    assert torch.allclose(y, ((te - lo) / (hi - lo)).float(), atol=1e-6)

    x, y = run(train, test, tmp_path, normalization="simple")
    assert torch.allclose(y, ((te - tr.mean()) / tr.std()).float(), atol=1e-5)
    assert abs(x.mean()) < 1e-5 and abs(x.double().std() - 1) < 1e-5

    x, y = run(train, test, tmp_path, normalization="channel")
    mean, std = tr.mean((0, 2, 3), keepdim=True), tr.std((0, 2, 3), keepdim=True)
    assert torch.allclose(y, ((te - mean) / std).float(), atol=1e-5)
    assert torch.allclose(x.double().std((0, 2, 3)), torch.ones(3, dtype=torch.float64))

    x, y = run(train, test, tmp_path, normalization="image")
    assert torch.allclose(y, ((te - tr.mean(0)) / tr.std(0)).float(), atol=1e-5)
    assert torch.allclose(x.mean(0), torch.zeros(3, 4, 4), atol=1e-5)


def test_declared_constant_shapes_are_what_fit_returns():
    """A cache is checked against these shapes: they must be what each method fits."""
    x = correlated_images(30).float()  # (30, 3, 4, 4)
    expected = {"scale": (), "simple": (1, 1, 1, 1), "channel": (1, 3, 1, 1), "image": (1, 3, 4, 4)}
    assert tuple(NORMALIZATIONS) == tuple(expected)  # the one list of allowed names
    for name, method in NORMALIZATIONS.items():
        assert method.shape((3, 4, 4)) == expected[name]
        constants = method.fit(x)
        assert {k: (tuple(v.shape), v.dtype) for k, v in constants.items()} == {
            "shift": (expected[name], torch.float64), "divisor": (expected[name], torch.float64)}  # fmt: skip
    assert zca_shapes((3, 4, 4)) == {"mean": (48,), "P": (48, 48)}
    assert {k: tuple(v.shape) for k, v in fit_zca(x).items()} == zca_shapes((3, 4, 4))


def test_constant_pixels_do_not_divide_by_zero(tmp_path):
    train = correlated_images(40)
    train[:, :, 0, 0] = 0  # like MNIST's corners
    x, _ = run(train, train, tmp_path, normalization="image")
    assert x.isfinite().all() and (x[:, :, 0, 0] == 0).all()


def test_unknown_options_list_valid_names(tmp_path):
    x = correlated_images(4)
    with pytest.raises(ValueError, match="scale, simple, channel, image"):
        run(x, x, tmp_path, normalization="zscore")
    with pytest.raises(ValueError, match="rgb, yuv"):
        run(x, x, tmp_path, format="hsv")


# ------------------------------------------------------------ ZCA


def test_zca_whitens_training_data(tmp_path):
    train, test = correlated_images(2000, 1), correlated_images(300, 2)
    x, y = run(train, test, tmp_path, whiten=True)
    assert x.shape == train.shape and x.dtype == torch.float32
    flat = x.reshape(len(x), -1).double()
    cov = torch.cov(flat.T)
    assert torch.allclose(cov, torch.eye(48, dtype=torch.float64), atol=1e-3)
    assert flat.mean(0).abs().max() < 1e-3
    # the test split goes through the training constants, unchanged
    c = fit_zca(train.double())
    expected = (test.reshape(300, -1).double() - c["mean"]) @ c["P"]
    assert torch.allclose(y.reshape(300, -1).double(), expected, atol=1e-3)
    # ZCA is symmetric: P = P^T, the whitening closest to the identity
    assert torch.allclose(c["P"], c["P"].T)


def test_zca_formula_small():
    x = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    c = fit_zca(x)
    xc = x - x.mean(0)
    lam, v = torch.linalg.eigh(xc.T @ xc / (len(x) - 1))
    p = v @ torch.diag(1 / torch.sqrt(lam + 1e-5)) @ v.T
    assert torch.allclose(c["P"], p, atol=1e-8)
    assert torch.allclose(apply_zca(x, c).double(), (xc @ p), atol=1e-4)


# ------------------------------------------------------------ cache


def test_cache_reused(tmp_path, monkeypatch):
    train, test = correlated_images(300), correlated_images(20, 5)
    first = run(train, test, tmp_path, whiten=True)
    path = cache_path(tmp_path, "toy", validate=False, fmt="rgb", method="zca",
                      train_images=train)  # fmt: skip
    assert path.is_file() and path.parent.name == "toy"

    def refit(_):
        raise AssertionError("the cached constants should have been loaded")

    monkeypatch.setattr(pipeline, "fit_zca", refit)
    second = run(train, test, tmp_path, whiten=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    monkeypatch.setitem(NORMALIZATIONS, "scale", NORMALIZATIONS["scale"]._replace(fit=refit))
    with pytest.raises(AssertionError, match="should have been loaded"):
        run(train, test, tmp_path)  # scale was never cached: it must fit
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files


def test_cache_keyed_by_data_split_and_method(tmp_path):
    a, b = correlated_images(100, 1), correlated_images(100, 2)

    def key(images, **kw):
        opts = {"validate": False, "fmt": "rgb", "method": "zca"} | kw
        return cache_path(tmp_path, "toy", train_images=images, **opts)

    assert key(a) == key(a.clone())
    names = {key(a), key(b), key(a, validate=True), key(a, method="scale"), key(a, fmt="yuv"),
             key(a[:99])}  # fmt: skip
    assert len(names) == 6
    run(a, a, tmp_path, whiten=True)
    run(b, b, tmp_path, whiten=True)
    run(a, a, tmp_path, whiten=True, validate=True)
    assert len(list((tmp_path / "toy").glob("*.pt"))) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong content"])
def test_corrupt_cache_is_refitted(tmp_path, caplog, damage):
    train = correlated_images(200)
    good = run(train, train, tmp_path, whiten=True)[0]
    path = cache_path(tmp_path, "toy", validate=False, fmt="rgb", method="zca",
                      train_images=train)  # fmt: skip
    if damage == "garbage":
        path.write_bytes(b"\x80\x02not a torch file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        torch.save({"mean": torch.full((48,), float("nan"))}, path)
    with caplog.at_level(logging.WARNING):
        again = run(train, train, tmp_path, whiten=True)[0]
    assert "recomputing" in caplog.text and str(path) in caplog.text
    assert torch.allclose(again, good)
    assert set(torch.load(path, weights_only=True)["constants"]) == {"mean", "P"}  # rewritten


# ------------------------------------------------------------ augmentation


def test_augment_shape_and_determinism():
    x = torch.rand(16, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(7))
    b = augment(x, torch.Generator().manual_seed(7))
    c = augment(x, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert augment(torch.rand(4, 1, 8, 8), torch.Generator()).shape == (4, 1, 8, 8)


def test_identity_and_flip():
    x = torch.rand(5, 3, 32, 32)
    zero = torch.zeros(5, dtype=torch.long)
    same = crop_flip_resize(x, zero, zero, zero, torch.zeros(5, dtype=torch.bool))
    assert torch.allclose(same, x, atol=1e-5)
    flips = torch.tensor([True, False, True, False, False])
    out = crop_flip_resize(x, zero, zero, zero, flips)
    assert torch.allclose(out[flips], x[flips].flip(-1), atol=1e-5)
    assert torch.allclose(out[~flips], x[~flips], atol=1e-5)


def test_crop_matches_interpolating_each_crop():
    x = torch.rand(6, 2, 32, 32)
    shrink = torch.tensor([8, 3, 0, 5, 8, 1])
    top = torch.tensor([0, 3, 0, 2, 8, 1])
    left = torch.tensor([8, 0, 0, 5, 4, 0])
    flip = torch.tensor([False, True, True, False, True, False])
    out = crop_flip_resize(x, shrink, top, left, flip)
    for i in range(6):
        side = 32 - int(shrink[i])
        crop = x[i : i + 1, :, top[i] : top[i] + side, left[i] : left[i] + side]
        ref = F.interpolate(crop, size=(32, 32), mode="bilinear", align_corners=False)
        ref = ref.flip(-1) if flip[i] else ref
        assert torch.allclose(out[i : i + 1], ref, atol=1e-5), i


def test_augment_draws_cover_the_range():
    # a horizontal ramp: value = column index; a flip reverses it, a crop narrows it
    x = torch.arange(32.0).expand(3000, 1, 32, 32).contiguous()
    out = augment(x, torch.Generator().manual_seed(0))
    flipped = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    assert 0.45 < flipped.float().mean() < 0.55
    span = (out[:, 0, 0, :].amax(1) - out[:, 0, 0, :].amin(1)).round()
    # s = 0 keeps the full span 31 (1/9 of draws); s = 8 narrows it to 23
    assert 0.08 < (span == 31).float().mean() < 0.14
    assert span.min() == 23 and 0.08 < (span == 23).float().mean() < 0.14


def test_jitter_is_a_whole_pixel_shift_filled_with_black_and_flip_mirrors():
    """RandomCrop(H, padding=P) + RandomHorizontalFlip: every output is the input shifted
    by (dy, dx) in [-P, P]², mirrored or not, its uncovered border = fill; the draws
    cover every shift and both orientations."""
    from feedalign.preprocess.augmentation import jitter_flip

    n, p = 400, 2
    x = torch.rand(n, 2, 6, 5) + 1  # > fill everywhere
    fill = torch.tensor([-1.0, -2.0])
    out = jitter_flip(x, torch.Generator().manual_seed(0), pixels=p, flip=True, fill=fill)
    seen = set()
    for i in range(n):
        padded = fill.view(2, 1, 1).expand(2, 6 + 2 * p, 5 + 2 * p).clone()
        padded[:, p : p + 6, p : p + 5] = x[i]
        views = {(t, l, f): (padded.flip(2) if f else padded)[:, t : t + 6, l : l + 5]
                 for t in range(2 * p + 1) for l in range(2 * p + 1) for f in (False, True)}  # fmt: skip
        found = [k for k, v in views.items() if torch.equal(out[i], v)]
        assert found, i
        seen.add(found[0])
    assert len(seen) == (2 * p + 1) ** 2 * 2
    still = jitter_flip(x, torch.Generator().manual_seed(0), pixels=0, flip=False, fill=fill)
    assert torch.equal(still, x)
