"""The modern recipes' augmentation: mixup/cutmix, RandAugment & co, random erasing.

Each is checked for what it does to pixels and targets, and for being a pure function of
(seed, epoch, batch or image) that leaves the global RNG alone, so resumed runs are exact.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from densenets.training.data import ArrayData, TensorLoader, build_data, pad_crop_flip
from densenets.training.imagefolder import (
    FolderLoader,
    Lighting,
    SafeImageFolder,
    build_folder_data,
    eval_transform,
    train_transform,
)
from densenets.training.mixing import BatchMix, make_mix
from densenets.training.recipes import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = [0.5] * 3, [0.25] * 3


def _batch(n: int = 6, classes: int = 10, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # Distinct classes: each row's target then shows the two weights separately.
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % classes


# ---------------------------------------------------------------------------- mixup / cutmix


@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_targets_are_probabilities_that_cross_entropy_takes(alphas):
    x, y = _batch()
    mix = BatchMix(10, *alphas, seed=1)
    for b in range(3):
        xm, t = mix(x, y, epoch=0, batch=b)
        assert xm.shape == x.shape and t.shape == (6, 10) and t.dtype == torch.float32
        assert torch.allclose(t.sum(1), torch.ones(6), atol=1e-6) and (t >= 0).all()
        logits = torch.randn(6, 10, requires_grad=True)
        loss = F.cross_entropy(logits, t, label_smoothing=0.1)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
        assert logits.grad.abs().sum() > 0


def test_mixup_blends_each_image_with_its_neighbour_by_the_target_weight():
    x, y = _batch()
    mix = BatchMix(10, mixup_alpha=1.0)
    for b in range(4):
        xm, t = mix(x, y, epoch=2, batch=b)
        lam = t[torch.arange(6), y]  # the weight of each image's own class
        assert torch.allclose(lam, lam[0].expand(6), atol=1e-6)  # one weight per batch
        assert 0 < lam[0] < 1
        assert torch.allclose(t[torch.arange(6), y.roll(1)], 1 - lam, atol=1e-6)
        assert torch.allclose(xm, lam[0] * x + (1 - lam[0]) * x.roll(1, 0), atol=1e-5)


def test_cutmix_pastes_a_box_of_the_neighbour_weighted_by_its_area():
    x, y = _batch(size=16)
    mix = BatchMix(10, cutmix_alpha=1.0, seed=4)
    pasted_any = False
    for b in range(6):
        xm, t = mix(x, y, epoch=0, batch=b)
        own, other = xm == x, xm == x.roll(1, 0)
        assert (own | other).all()  # every pixel comes from the image or its neighbour
        box = other.all(1)  # (N, H, W): the pasted pixels, the same in every channel
        assert torch.equal(box, other.any(1)) and torch.equal(box, box[:1].expand_as(box))
        rows, cols = box[0].any(1).nonzero(), box[0].any(0).nonzero()
        area = box[0].float().mean()
        if area > 0:  # a rectangle, whose area fraction is the neighbour's target weight
            pasted_any = True
            assert box[0].sum() == len(rows) * len(cols)
        assert torch.allclose(t[torch.arange(6), y.roll(1)], area.expand(6), atol=1e-6)
        assert torch.allclose(t[torch.arange(6), y], 1 - area.expand(6), atol=1e-6)
    assert pasted_any


def test_switch_prob_chooses_cutmix_or_mixup():
    x, y = _batch()
    always_cut = BatchMix(10, 0.8, 1.0, switch_prob=1.0)
    always_mix = BatchMix(10, 0.8, 1.0, switch_prob=0.0)
    for b in range(3):
        xc, _ = always_cut(x, y, 0, b)
        assert ((xc == x) | (xc == x.roll(1, 0))).all()
        xm, t = always_mix(x, y, 0, b)
        lam = t[0, y[0]]
        assert torch.allclose(xm, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-5)


def test_mixing_is_a_function_of_seed_epoch_batch_rank_and_spares_the_global_rng():
    x, y = _batch()
    mix = BatchMix(10, 0.8, 1.0, seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    xa, ta = mix(x, y, epoch=3, batch=5)
    assert torch.equal(torch.get_rng_state(), before)
    xb, tb = BatchMix(10, 0.8, 1.0, seed=7)(x, y, epoch=3, batch=5)
    assert torch.equal(xa, xb) and torch.equal(ta, tb)
    for key in (dict(epoch=3, batch=6), dict(epoch=4, batch=5), dict(epoch=3, batch=5, rank=1)):
        xo, to = mix(x, y, **key)
        assert not torch.equal(to, ta), key
    xs, ts = BatchMix(10, 0.8, 1.0, seed=8)(x, y, epoch=3, batch=5)
    assert not torch.equal(ts, ta)
    assert torch.equal(torch.get_rng_state(), before)


def test_unmixed_batches_keep_their_images_and_get_one_hot_targets():
    x, y = _batch()
    x_before = x.clone()
    xm, t = BatchMix(10, 0.8, 1.0, prob=0.0)(x, y, 0, 0)
    assert torch.equal(xm, x_before) and torch.equal(t, F.one_hot(y, 10).float())
    # Batches of one (or none) have no partner to mix with.
    x1, t1 = BatchMix(10, 0.8, 1.0)(x[:1], y[:1], 0, 0)
    assert torch.equal(x1, x[:1]) and torch.equal(t1, F.one_hot(y[:1], 10).float())
    x0, t0 = BatchMix(10, 0.8, 1.0)(x[:0], y[:0], 0, 0)
    assert x0.shape == (0, 3, 8, 8) and t0.shape == (0, 10)
    # The caller's images are never written to.
    BatchMix(10, 0.0, 1.0)(x, y, 0, 0)
    BatchMix(10, 1.0, 0.0)(x, y, 0, 0)
    assert torch.equal(x, x_before)
    # Labels of a narrower integer type are accepted (v2 needs int64; converted here).
    _, t32 = BatchMix(10, 0.8, 1.0, prob=0.0)(x, y.int(), 0, 0)
    assert torch.equal(t32, t)


def test_mixing_refuses_bad_settings_and_inputs():
    with pytest.raises(ValueError, match="mixup alpha must be >= 0"):
        BatchMix(10, mixup_alpha=-1)
    with pytest.raises(ValueError, match=r"mixup_prob is a probability"):
        BatchMix(10, 0.8, prob=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        BatchMix(0, 0.8)
    x, y = _batch()
    with pytest.raises(ValueError, match="class indices"):
        BatchMix(10, 0.8)(x, y.float(), 0, 0)
    with pytest.raises(ValueError, match=r"labels \(N,\)"):
        BatchMix(10, 0.8)(x, F.one_hot(y, 10), 0, 0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        BatchMix(10, 0.8)(x[0], y, 0, 0)


def test_make_mix_follows_the_config():
    assert make_mix(TrainConfig(), 10) is None
    assert make_mix(SimpleNamespace(seed=0), 10) is None  # a config older than mixing
    mix = make_mix(TrainConfig(mixup=0.8, cutmix=1.0, mixup_prob=0.5, mixup_switch_prob=0.25,
                               seed=3), 7)
    assert isinstance(mix, BatchMix) and mix.num_classes == 7 and mix.seed == 3
    assert (mix.prob, mix.switch_prob) == (0.5, 0.25)
    assert mix.mixup is not None and mix.cutmix is not None
    assert make_mix(TrainConfig(cutmix=1.0), 7).mixup is None


# ---------------------------------------------------------------------------- image folders


def _image(h: int = 20, w: int = 24, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _ops(tf) -> list[type]:
    return [type(op) for op in tf.transforms]


def test_modern_policy_gives_a_normalised_crop_reproducible_by_seed():
    img = _image()
    tf = train_transform(16, None, MEAN, STD, "modern", auto_augment="rand-m9-n2",
                         random_erasing=0.25)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(tf(img))
    x = outs[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -2 and x.max() <= 2 and x.min() < 0  # (pixel - 0.5) / 0.25
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert _ops(tf)[:3] == [T.RandomResizedCrop, T.RandomHorizontalFlip, v2.RandAugment]
    assert _ops(tf)[-1] is v2.RandomErasing
    assert _ops(train_transform(16, None, MEAN, STD, "modern", auto_augment="trivial"))[2] \
        is v2.TrivialAugmentWide


def test_random_erasing_fills_a_patch_with_the_mean_colour():
    img = _image()
    plain = train_transform(16, None, MEAN, STD, "none")(img)
    assert not (plain == 0).any()  # no 8-bit pixel is exactly the mean 0.5
    for policy in ("none", "modern", "standard"):
        tf = train_transform(16, None, MEAN, STD, policy, random_erasing=1.0)
        torch.manual_seed(0)
        x = tf(img)
        zero = (x == 0).all(0)
        assert zero.any() and torch.equal(zero, (x == 0).any(0)), policy
    never = train_transform(16, None, MEAN, STD, "none", random_erasing=1e-9)
    assert torch.equal(never(img), plain)


def test_colour_jitter_is_skipped_while_an_auto_augment_policy_is_on():
    jitter = train_transform(16, None, MEAN, STD, "modern", color_jitter=0.4)
    assert v2.ColorJitter in _ops(jitter) and v2.RandAugment not in _ops(jitter)
    both = train_transform(16, None, MEAN, STD, "modern", auto_augment="rand-m9-n2",
                           color_jitter=0.4)
    assert v2.RandAugment in _ops(both) and v2.ColorJitter not in _ops(both)
    # ImageNet keeps the paper's one jitter; extras go after it.
    imagenet = train_transform(16, None, MEAN, STD, "imagenet", color_jitter=0.4,
                               auto_augment="trivial")
    assert _ops(imagenet).count(T.ColorJitter) == 1 and v2.ColorJitter not in _ops(imagenet)
    assert _ops(imagenet).index(v2.TrivialAugmentWide) == _ops(imagenet).index(T.ToTensor) - 1
    assert _ops(train_transform(16, None, MEAN, STD, "imagenet", color_jitter=0.4)) == \
        _ops(train_transform(16, None, MEAN, STD, "imagenet"))
    # The colour op changes colours (on the PIL image, before the tensor).
    img = _image()
    torch.manual_seed(0)
    assert not torch.equal(train_transform(16, 16, MEAN, STD, "none", color_jitter=0.4)(img),
                           eval_transform(16, 16, MEAN, STD)(img))


def test_the_old_policies_are_unchanged_without_extras():
    img = _image()
    old = {  # the compositions before the modern extras, op for op
        "imagenet": T.Compose([T.RandomResizedCrop(16), T.RandomHorizontalFlip(),
                               T.ColorJitter(0.4, 0.4, 0.4), T.ToTensor(), Lighting(0.1),
                               T.Normalize(MEAN, STD)]),
        "standard": T.Compose([T.Resize(18), T.CenterCrop(16), T.ToTensor(),
                               T.Normalize(MEAN, STD), T.RandomCrop(16, padding=4),
                               T.RandomHorizontalFlip()]),
    }
    for policy, augment in (("imagenet", True), ("imagenet", "imagenet"),
                            ("standard", "standard")):
        for seed in range(3):
            torch.manual_seed(seed)
            ref = old[policy](img)
            torch.manual_seed(seed)
            assert torch.equal(train_transform(16, 18, MEAN, STD, augment)(img), ref)
    for augment in (False, "none"):
        assert torch.equal(train_transform(16, 18, MEAN, STD, augment)(img),
                           eval_transform(16, 18, MEAN, STD)(img))


def test_bad_extras_are_refused_with_what_to_use():
    with pytest.raises(ValueError, match="rand-m<M>-n<N>"):
        train_transform(16, None, MEAN, STD, "modern", auto_augment="autoaug-v0")
    with pytest.raises(ValueError, match="'x3' is not supported"):
        train_transform(16, None, MEAN, STD, "modern", auto_augment="rand-m9-x3")
    with pytest.raises(ValueError, match=r"random_erasing is a probability in \[0, 1\]"):
        train_transform(16, None, MEAN, STD, "modern", random_erasing=2.0)
    with pytest.raises(ValueError, match="color_jitter must be >= 0"):
        train_transform(16, None, MEAN, STD, "none", color_jitter=-0.1)
    with pytest.raises(ValueError, match="use none, standard, imagenet or modern"):
        train_transform(16, None, MEAN, STD, "fancy")


def _folder(root, per_class: int = 3):
    for c, cls in enumerate(("cat", "dog")):
        (root / "train" / cls).mkdir(parents=True)
        (root / "val" / cls).mkdir(parents=True)
        for i in range(per_class):
            _image(14 + i, 18, seed=10 * c + i).save(root / "train" / cls / f"{i}.png")
        _image(seed=99 + c).save(root / "val" / cls / "0.png")
    return root


def test_folder_images_are_seeded_per_image_under_the_new_ops(tmp_path):
    root = _folder(tmp_path)
    tf = train_transform(12, None, MEAN, STD, "modern", auto_augment="rand-m9-n2",
                         random_erasing=0.5)
    ds = SafeImageFolder(root / "train", tf)
    assert torch.equal(ds[(2, 77)][0], ds[(2, 77)][0])
    assert not torch.equal(ds[(2, 77)][0], ds[(2, 78)][0])
    loader = FolderLoader(ds, 4, shuffle=True, seed=1)
    full = list(loader.batches(3))
    torch.manual_seed(5)  # the global RNG plays no part
    again = list(loader.batches(3))
    tail = list(loader.batches(3, start=1))
    for (xa, ya), (xb, yb) in zip(full[1:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again, strict=True))
    other = list(loader.batches(4))
    assert not torch.equal(torch.cat([x for x, _ in full]), torch.cat([x for x, _ in other]))


def test_build_folder_data_passes_the_extras(tmp_path):
    root = _folder(tmp_path)
    cfg = TrainConfig(recipe="folder", dataset="folder", data_dir=str(root), crop=12,
                      augmentation="modern", augment=True, mean=MEAN, std=STD, workers=0,
                      auto_augment="trivial", color_jitter=0.4, random_erasing=0.25)
    ops = _ops(build_folder_data(cfg, "cpu").loaders["train"].dataset.transform)
    assert v2.TrivialAugmentWide in ops and v2.RandomErasing in ops and v2.ColorJitter not in ops
    old = SimpleNamespace(**{k: v for k, v in vars(cfg).items()
                             if k not in ("auto_augment", "color_jitter", "random_erasing")})
    ops = _ops(build_folder_data(old, "cpu").loaders["train"].dataset.transform)
    assert ops == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]


# ---------------------------------------------------------------------------- in-memory data


def _digits_like() -> ArrayData:
    g = torch.Generator().manual_seed(0)
    return ArrayData(torch.randint(0, 17, (20, 1, 8, 8), generator=g) / 16.0,
                     torch.arange(20) % 10, [str(i) for i in range(10)])


def _cifar_like() -> ArrayData:
    g = torch.Generator().manual_seed(1)
    return ArrayData(torch.randint(0, 256, (20, 3, 12, 12), generator=g, dtype=torch.uint8),
                     torch.arange(20) % 10, [str(i) for i in range(10)])


def _loader(data: ArrayData, **kw) -> TensorLoader:
    c = data.images.shape[1]
    return TensorLoader(data, 6, [0.3] * c, [0.4] * c, shuffle=True, seed=3, pad=1, **kw)


def test_tensor_loader_without_extras_is_unchanged():
    for data in (_digits_like(), _cifar_like()):
        for augment in (False, True):
            plain = list(_loader(data, augment=augment).batches(2))
            off = list(_loader(data, augment=augment, auto_augment="", color_jitter=0.0,
                               random_erasing=0.0).batches(2))
            for (xa, ya), (xb, yb) in zip(plain, off, strict=True):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # ... and is what it always computed: normalise, then pad-crop-flip.
    data = _cifar_like()
    loader = _loader(data)
    g = torch.Generator().manual_seed(3 * 1_000_003 + 2)
    order = torch.randperm(20, generator=g)
    x, y = next(iter(loader.batches(2)))
    ref = (data.images[order[:6]].float() * (1 / 255) - 0.3) / 0.4
    assert torch.equal(x, ref) and torch.equal(y, data.labels[order[:6]])
    assert pad_crop_flip(ref, torch.ones(6, 2, dtype=torch.int64), torch.zeros(6).bool(),
                         1).equal(ref)


@pytest.mark.parametrize("make", [_digits_like, _cifar_like], ids=["1ch-float", "3ch-uint8"])
@pytest.mark.parametrize("extras", [dict(auto_augment="rand-m9-n2", random_erasing=0.5),
                                    dict(auto_augment="trivial"),
                                    dict(color_jitter=0.4, random_erasing=1.0)],
                         ids=["randaugment", "trivial", "jitter"])
def test_tensor_loader_extras_are_seeded_and_resume_exactly(make, extras):
    data = make()
    loader = _loader(data, augment=True, **extras)
    torch.manual_seed(9)
    before = torch.get_rng_state()
    full = list(loader.batches(1))
    assert torch.equal(torch.get_rng_state(), before)
    assert len(full) == 4 and all(x.dtype == torch.float32 for x, _ in full)
    assert full[0][0].shape[1:] == data.images.shape[1:]
    again = list(_loader(data, augment=True, **extras).batches(1))
    tail = list(loader.batches(1, start=2))
    for (xa, ya), (xb, yb) in zip(full, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(full[2:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    plain = list(_loader(data, augment=True).batches(1))
    assert not torch.equal(torch.cat([x for x, _ in full]), torch.cat([x for x, _ in plain]))
    assert torch.equal(torch.cat([y for _, y in full]), torch.cat([y for _, y in plain]))
    other = list(loader.batches(2))
    assert not torch.equal(torch.cat([x for x, _ in full]), torch.cat([x for x, _ in other]))


def test_tensor_loader_extras_do_not_depend_on_the_sharding():
    data = _cifar_like()

    def loader():
        return _loader(data, augment=True, auto_augment="rand-m9-n2", random_erasing=0.5)

    whole = list(loader().batches(0))
    shards = [list(loader().shard(r, 2).batches(0)) for r in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shards, strict=True):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_tensor_loader_erasing_fills_with_the_mean_and_checks_its_settings():
    data = _digits_like()
    data.images += 0.01  # no pixel then normalises to exactly 0 by chance (0.3 = the mean)
    erased = torch.cat([x for x, _ in _loader(data, random_erasing=1.0).batches(0)])
    plain = torch.cat([x for x, _ in _loader(data).batches(0)])
    assert not (plain == 0).any()
    assert ((erased == 0).flatten(1).any(1)).all()  # every image has its patch
    kept = erased != 0
    assert torch.equal(erased[kept], plain[kept])  # and nothing else changed
    with pytest.raises(ValueError, match="1- or 3-channel"):
        TensorLoader(ArrayData(torch.rand(4, 2, 8, 8), torch.zeros(4).long(), ["a"]), 2,
                     [0.5], [0.5], auto_augment="trivial")
    with pytest.raises(ValueError, match="random_erasing"):
        _loader(data, random_erasing=-0.5)
    with pytest.raises(ValueError, match="auto-augment"):
        _loader(data, auto_augment="rand-m40")


def test_build_data_gives_the_extras_to_training_only():
    cfg = TrainConfig(mean=[0.3], std=[0.4], auto_augment="trivial", random_erasing=0.25,
                      augment=True, augmentation="standard")
    loaders = build_data(cfg, splits=("train", "test")).loaders
    assert isinstance(loaders["train"].pixel, v2.TrivialAugmentWide)
    assert isinstance(loaders["train"].erase, v2.RandomErasing)
    assert loaders["test"].pixel is None and loaders["test"].erase is None
