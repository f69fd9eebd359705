"""Datasets and loaders: digits split, CIFAR/SVHN on-disk formats (fakes written here),
downloads from a local archive, bad-file handling in image folders, resumable batch order."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import write_fake_cifar, write_image_folder

from densenets.training import data
from densenets.training.data import (
    TensorLoader,
    holdout,
    load_cifar,
    load_digits_data,
    load_svhn,
    pad_crop_flip,
)
from densenets.training.imagefolder import (
    FolderLoader,
    SafeImageFolder,
    eval_transform,
    train_transform,
)

# ---------------------------------------------------------------- fakes in torchvision's layout


def write_fake_svhn(root: Path, sizes=(("train", 20), ("extra", 30), ("test", 10))) -> None:
    import scipy.io

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1)  # SVHN stores digit 0 as label 10
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})


# ---------------------------------------------------------------- digits and splits


def test_digits_split_is_fixed_stratified_80_20():
    train, test = load_digits_data()
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape[1:] == (1, 8, 8) and 0 <= train.images.min() < train.images.max() <= 1
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # each class ~20%
    again, _ = load_digits_data()
    assert torch.equal(train.labels, again.labels) and torch.equal(train.images, again.images)


def test_holdout_is_fixed_and_disjoint():
    train, _ = load_digits_data()
    a_train, a_val = holdout(train, 100)
    b_train, b_val = holdout(train, 100)
    assert len(a_val) == 100 and len(a_train) == len(train) - 100
    assert torch.equal(a_val.images, b_val.images)
    with pytest.raises(ValueError, match="--val-split"):
        holdout(train, len(train))


# ---------------------------------------------------------------- in-memory batching


def _loader(**kw) -> TensorLoader:
    train, _ = load_digits_data()
    return TensorLoader(train, 64, [0.3], [0.4], shuffle=True, seed=3, **kw)


def test_batches_are_a_function_of_seed_and_epoch_and_resume_exactly():
    loader = _loader(augment=True, pad=1)
    full = list(loader.batches(epoch=2))
    assert len(full) == len(loader) == 23
    tail = list(loader.batches(epoch=2, start=5))
    for (xa, ya), (xb, yb) in zip(full[5:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = list(loader.batches(epoch=3))
    assert not torch.equal(full[0][1], other[0][1])
    seen = torch.cat([y for _, y in full])
    assert len(seen) == 1437  # every image once per epoch


def test_pad_crop_flip_matches_a_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, 7, generator=g)
    shifts = torch.randint(0, 5, (6, 2), generator=g)
    flips = torch.tensor([True, False, True, False, False, True])
    out = pad_crop_flip(x, shifts, flips, pad=2)
    for i in range(6):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        ref = padded[:, shifts[i, 0]:shifts[i, 0] + 5, shifts[i, 1]:shifts[i, 1] + 7]
        if flips[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


# ---------------------------------------------------------------- CIFAR and SVHN formats


def test_cifar_reads_torchvision_layout(tmp_path):
    write_fake_cifar(tmp_path, n_train=50, n_test=20)
    train, test = load_cifar(tmp_path, "cifar10")
    assert train.images.shape == (50, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 20 and train.class_names[3] == "class3"
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert torch.equal(train.images[:10].reshape(10, -1), torch.as_tensor(raw["data"]))


def test_cifar_missing_files_name_them_and_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_cifar(tmp_path, "cifar10")
    msg = str(e.value)
    assert "data_batch_1" in msg and "test_batch" in msg and str(tmp_path) in msg
    assert "--download" in msg


def test_cifar_refuses_pickles_that_would_run_code(tmp_path):
    folder = write_fake_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (folder / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        load_cifar(tmp_path, "cifar10")


def test_cifar_download_fetches_checks_and_extracts(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_fake_cifar(src)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    entry = dict(data.CIFAR["cifar10"], url=archive.as_uri(), md5=md5)
    monkeypatch.setitem(data.CIFAR, "cifar10", entry)
    train, test = load_cifar(tmp_path / "dl", "cifar10", download=True)
    assert len(train) == 60 and len(test) == 30
    hand = tmp_path / "hand"  # an archive copied in by hand is unpacked without --download
    hand.mkdir()
    (hand / archive.name).write_bytes(archive.read_bytes())
    assert len(load_cifar(hand, "cifar10")[0]) == 60
    monkeypatch.setitem(data.CIFAR, "cifar10", dict(entry, md5="0" * 32))
    with pytest.raises(ValueError, match="wrong MD5"):
        load_cifar(tmp_path / "dl2", "cifar10", download=True)
    monkeypatch.setitem(data.CIFAR, "cifar10", dict(entry, url=(tmp_path / "nope").as_uri()))
    with pytest.raises(FileNotFoundError, match="could not download"):
        load_cifar(tmp_path / "dl3", "cifar10", download=True)


def test_svhn_is_train_plus_extra_with_label_10_as_0(tmp_path):
    write_fake_svhn(tmp_path)
    train, test = load_svhn(tmp_path)
    assert len(train) == 50 and len(test) == 10
    assert train.labels[:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    import scipy.io

    x = scipy.io.loadmat(tmp_path / "train_32x32.mat")["X"]
    assert torch.equal(train.images[0], torch.as_tensor(x[..., 0]).permute(2, 0, 1))
    (tmp_path / "extra_32x32.mat").unlink()
    with pytest.raises(FileNotFoundError, match="extra_32x32.mat"):
        load_svhn(tmp_path)


# ---------------------------------------------------------------- image folders


def _bad_folder(tmp_path: Path) -> Path:
    root = write_image_folder(tmp_path / "ds")
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    good = io.BytesIO()
    Image.new("RGB", (20, 20)).save(good, format="JPEG")
    (root / "train" / "dog" / "truncated.jpg").write_bytes(good.getvalue()[:60])
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    return root


def test_folder_skips_unreadable_images_by_path_and_carries_on(tmp_path, capsys):
    root = _bad_folder(tmp_path)
    ds = SafeImageFolder(root / "train", eval_transform(16, 18, [0.5] * 3, [0.25] * 3))
    assert len(ds) == 10  # 8 good + 2 bad images; notes.txt is not a sample
    loader = FolderLoader(ds, 4, shuffle=True)
    ys = torch.cat([y for _, y in loader.batches(0)])
    assert len(ys) == 8
    err = capsys.readouterr().err
    assert "broken.png" in err and "truncated.jpg" in err and "notes.txt" in err
    list(loader.batches(1))
    assert capsys.readouterr().err.count("broken.png") == 0  # reported once per run


def test_folder_strict_makes_bad_files_fatal(tmp_path):
    root = _bad_folder(tmp_path)
    with pytest.raises(ValueError, match="notes.txt"):
        SafeImageFolder(root / "train", eval_transform(16, 18, [0.5] * 3, [0.25] * 3),
                        strict=True)
    (root / "train" / "dog" / "notes.txt").unlink()
    ds = SafeImageFolder(root / "train", eval_transform(16, 18, [0.5] * 3, [0.25] * 3),
                         strict=True)
    with pytest.raises(ValueError, match=r"(broken\.png|truncated\.jpg).*--strict"):
        list(FolderLoader(ds, 4, strict=True).batches(0))


def test_folder_augmentation_is_seeded_per_image_so_resume_is_exact(tmp_path):
    root = write_image_folder(tmp_path / "ds", per_class=5)
    tf = train_transform(16, 18, [0.5] * 3, [0.25] * 3, augment=True)
    loader = FolderLoader(SafeImageFolder(root / "train", tf), 3, shuffle=True, seed=1)
    full = list(loader.batches(4))
    tail = list(loader.batches(4, start=2))
    for (xa, ya), (xb, yb) in zip(full[2:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    again = list(loader.batches(5))
    assert not torch.equal(torch.cat([x for x, _ in full]), torch.cat([x for x, _ in again]))
