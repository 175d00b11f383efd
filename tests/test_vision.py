"""Image encoders (SmallCNN, ResNetEncoder), the synthetic image data and their CLI configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import CONFIGS, QUICKSTART, QUIET_TRAINER, run_cli

from mtl_lightning.data import SyntheticImageDataModule
from mtl_lightning.data.base import DataError
from mtl_lightning.encoders import ResNetEncoder, SmallCNN
from mtl_lightning.encoders.resnet import adapt_input_conv
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import IGNORE_INDEX

IMAGE_TASKS = [
    {"name": "top", "kind": "binary"},
    {"name": "shape", "kind": "multiclass", "num_outputs": 4},
    {"name": "count", "kind": "multiclass", "num_outputs": 3},
    {"name": "position", "kind": "regression", "num_outputs": 2},
]


# ---------------------------------------------------------------------------------------------------- SmallCNN
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 20, 24)])
@pytest.mark.parametrize("pooling", ["flatten", "avg"])
def test_small_cnn_output_width_is_out_features(shape: tuple[int, int, int], pooling: str) -> None:
    for fc_width in (64, None):
        encoder = SmallCNN(shape, pooling=pooling, fc_width=fc_width)
        out = encoder(torch.randn(5, *shape))
        assert out.shape == (5, encoder.out_features)
        assert encoder.out_features == (
            fc_width or (64 if pooling == "avg" else 64 * (shape[1] // 4) * (shape[2] // 4))
        )


def test_small_cnn_lenet_settings_match_sener_koltun_multimnist_encoder() -> None:
    # conv 5x5 (10) -> pool -> conv 5x5 (20) -> pool: 28 -> 24 -> 12 -> 8 -> 4; 320 features -> fc 50
    encoder = SmallCNN((1, 28, 28), channels=[10, 20], kernel_size=5, padding=0, norm="none", fc_width=50)
    assert encoder.feature_shape == (20, 4, 4) and encoder.out_features == 50
    assert not any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    assert encoder(torch.randn(2, 1, 28, 28)).shape == (2, 50)


def test_small_cnn_rejects_bad_settings_and_inputs() -> None:
    with pytest.raises(ConfigError, match="shrink a 28x28 image to nothing"):
        SmallCNN((1, 28, 28), channels=[8, 8, 8, 8, 8, 8])
    with pytest.raises(ConfigError, match=r"input_shape must be \(channels, height, width\)"):
        SmallCNN((64,))
    with pytest.raises(ConfigError, match="norm must be"):
        SmallCNN((1, 28, 28), norm="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"built for images of shape \(N, 1, 28, 28\)"):
        SmallCNN((1, 28, 28))(torch.randn(2, 3, 28, 28))


# ----------------------------------------------------------------------------------------------- ResNetEncoder
# Parameters of torchvision's resnet18/34/50 (11,689,512 / 21,797,672 / 25,557,032) less their 1000-class fc.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512 - 513_000,
    "resnet34": 21_797_672 - 513_000,
    "resnet50": 25_557_032 - 2_049_000,
}


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_resnet_has_torchvision_size_without_classifier(arch: str) -> None:
    encoder = ResNetEncoder((3, 32, 32), arch=arch)  # type: ignore[arg-type]
    assert sum(p.numel() for p in encoder.parameters()) == TORCHVISION_PARAMS[arch]
    assert encoder.out_features == (2048 if arch == "resnet50" else 512)
    assert not any(k.startswith("fc.") for k in encoder.state_dict())


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_resnet_forward_any_channels(channels: int) -> None:
    encoder = ResNetEncoder((channels, 32, 32)).eval()
    assert encoder.conv1.in_channels == channels
    assert encoder(torch.randn(2, channels, 32, 32)).shape == (2, 512)
    assert len(encoder.fsdp_units()) == 8  # resnet18: 2 blocks in each of 4 stages
    with pytest.raises(ValueError, match=f"built for images with {channels} channel"):
        encoder(torch.randn(2, channels + 1, 32, 32))


def _torchvision_style_file(path: Path, arch: str = "resnet18", seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict as torchvision's ResNet has it (3 input channels, with its fc), saved to ``path``."""
    torch.manual_seed(seed)
    source = ResNetEncoder((3, 32, 32), arch=arch)  # type: ignore[arg-type]
    for module in source.modules():  # non-trivial BatchNorm statistics, to see they are loaded too
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    state = dict(source.state_dict())
    state["fc.weight"] = torch.randn(1000, source.out_features)
    state["fc.bias"] = torch.randn(1000)
    torch.save(state, path)
    return state


def test_resnet_loads_weights_from_a_local_file(tmp_path: Path) -> None:
    saved = _torchvision_style_file(tmp_path / "resnet18.pth")
    encoder = ResNetEncoder((3, 32, 32), weights_path=tmp_path / "resnet18.pth")
    loaded = encoder.state_dict()
    assert set(loaded) == {k for k in saved if not k.startswith("fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key


def test_resnet_adapts_the_first_conv_to_other_channel_counts(tmp_path: Path) -> None:
    saved = _torchvision_style_file(tmp_path / "resnet18.pth")
    grey = ResNetEncoder((1, 28, 28), weights_path=tmp_path / "resnet18.pth").eval()
    torch.testing.assert_close(grey.conv1.weight, saved["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(grey.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])
    # A grey image through the adapted conv equals the same grey in RGB through the original one.
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(
        grey.conv1(x), F.conv2d(x.expand(-1, 3, -1, -1), saved["conv1.weight"], stride=2, padding=3)
    )
    four = adapt_input_conv(saved["conv1.weight"], 4)
    assert four.shape[1] == 4 and torch.allclose(four[:, 3], saved["conv1.weight"][:, 0] * 0.75)


def test_resnet_loads_the_encoder_of_a_lightning_checkpoint(tmp_path: Path) -> None:
    source = ResNetEncoder((1, 32, 32))
    state = {f"encoder.{k}": v for k, v in source.state_dict().items()}
    state["heads.top.weight"] = torch.zeros(1, 512)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "model.ckpt")
    encoder = ResNetEncoder((1, 32, 32), weights_path=str(tmp_path / "model.ckpt"))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in encoder.state_dict().items())


def test_resnet_weight_file_that_does_not_fit_names_the_keys(tmp_path: Path) -> None:
    _torchvision_style_file(tmp_path / "resnet18.pth")
    with pytest.raises(ConfigError, match=r"missing keys \['layer1.2.conv1.weight'.*and \d+ more") as err:
        ResNetEncoder((3, 32, 32), arch="resnet34", weights_path=tmp_path / "resnet18.pth")
    assert "torchvision resnet34" in str(err.value)
    resnet50 = r"unexpected keys \['layer1.0.conv3.weight'.*; shapes \['layer1.0.conv1.weight \(64, 64, 1, 1\) != \(64, 64, 3, 3\)'"
    with pytest.raises(ConfigError, match=resnet50):
        ResNetEncoder((3, 32, 32), arch="resnet18", weights_path=_save_resnet50(tmp_path))
    state = torch.load(tmp_path / "resnet18.pth")
    state["extra.weight"] = torch.zeros(1)
    state["layer1.0.bn1.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(
        ConfigError, match=r"unexpected keys \['extra.weight'\]; shapes \['layer1.0.bn1.weight \(3,\) != \(64,\)'\]"
    ):
        ResNetEncoder((3, 32, 32), weights_path=tmp_path / "odd.pth")


def _save_resnet50(tmp_path: Path) -> Path:
    path = tmp_path / "resnet50.pth"
    torch.save(ResNetEncoder((3, 32, 32), arch="resnet50").state_dict(), path)
    return path


def test_resnet_weight_file_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a file"):
        ResNetEncoder((3, 32, 32), weights_path=tmp_path / "absent.pth")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pth")  # the whole module, not its state dict
    with pytest.raises(ConfigError, match=r"torch.save\(model.state_dict\(\), path\)"):
        ResNetEncoder((3, 32, 32), weights_path=tmp_path / "module.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match="holds a list, not a state dict"):
        ResNetEncoder((3, 32, 32), weights_path=tmp_path / "list.pth")
    with pytest.raises(ConfigError, match="arch must be one of"):
        ResNetEncoder((3, 32, 32), arch="resnet101")  # type: ignore[arg-type]


def test_resnet_freeze_bn_keeps_statistics_and_affine_fixed() -> None:
    encoder = ResNetEncoder((3, 32, 32), freeze_bn=True)
    norms = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    encoder.train()
    assert encoder.training and not any(m.training for m in norms)
    assert not any(p.requires_grad for m in norms for p in m.parameters())
    assert encoder.conv1.weight.requires_grad
    before = norms[0].running_mean.clone()
    encoder(torch.randn(4, 3, 32, 32) + 3)
    assert torch.equal(norms[0].running_mean, before)


def _working_torchvision():
    """torchvision.models, or skip: it may be absent, or installed from PyPI against a CPU torch, where its import
    raises (RuntimeError: operator torchvision::nms does not exist), not ImportError."""
    try:
        import torchvision.models as models
    except Exception as err:  # any failure means "no usable torchvision here"
        pytest.skip(f"torchvision is not usable here: {type(err).__name__}: {err}")
    return models


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_matches_torchvision_when_installed(arch: str, tmp_path: Path) -> None:
    models = _working_torchvision()
    reference = getattr(models, arch)(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    encoder = ResNetEncoder((3, 64, 64), arch=arch, weights_path=tmp_path / "tv.pth").eval()  # type: ignore[arg-type]
    assert encoder.out_features == reference.fc.in_features
    reference.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(encoder(x), reference(x))


# ------------------------------------------------------------------------------------------------------- data
def test_image_data_is_deterministic_in_the_seed() -> None:
    a = SyntheticImageDataModule(IMAGE_TASKS, num_samples=300, seed=3).generate()
    b = SyntheticImageDataModule(IMAGE_TASKS, num_samples=300, seed=3).generate()
    c = SyntheticImageDataModule(IMAGE_TASKS, num_samples=300, seed=4).generate()
    assert torch.equal(a.inputs, b.inputs) and all(torch.equal(a.targets[k], b.targets[k]) for k in a.targets)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_image_data_shapes_and_labels(channels: int, size: int) -> None:
    dm = SyntheticImageDataModule(IMAGE_TASKS, num_samples=500, image_size=size, channels=channels, batch_size=50)
    assert dm.input_shape == (channels, size, size)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (50, channels, size, size) and batch["inputs"].dtype == torch.float32
    targets = dm.datasets["train"].targets
    assert len(dm.datasets["train"]) == 400 and len(dm.datasets["val"]) == 50
    assert set(targets["top"].unique().tolist()) == {0.0, 1.0}
    assert set(targets["shape"].unique().tolist()) == {0, 1, 2, 3}
    assert set(targets["count"].unique().tolist()) == {0, 1, 2}
    assert targets["position"].shape == (400, 2) and targets["position"].dtype == torch.float32


def test_image_labels_describe_what_is_drawn() -> None:
    tasks = [{"name": "top", "kind": "binary"}, {"name": "n", "kind": "multiclass", "num_outputs": 3}]
    tasks.append({"name": "bright", "kind": "regression"})
    dm = SyntheticImageDataModule(tasks, sources={"n": "count", "bright": "brightness"}, num_samples=600, noise=0.0)
    data = dm.generate()
    x, y = data.inputs[:, 0], data.targets
    pixels = x.mean(dim=(1, 2))  # noise-free: the standardised mean brightness is the label
    torch.testing.assert_close(y["bright"], (pixels - pixels.mean()) / pixels.std(), atol=1e-4, rtol=0)
    # The main shape dominates: where it is in the top half, the top half is brighter (overlaps aside).
    upper = x[:, :14].sum(dim=(1, 2)) > x[:, 14:].sum(dim=(1, 2))
    assert (upper == y["top"].bool()).float().mean() > 0.85
    lit = [float((x[y["n"] == k] > 0).float().mean()) for k in range(3)]  # more shapes, more lit pixels
    assert lit[0] < lit[1] < lit[2], lit


def test_image_sources_by_name_by_kind_and_explicit() -> None:
    tasks = [
        {"name": "a", "kind": "binary"},
        {"name": "b", "kind": "binary"},
        {"name": "c", "kind": "multiclass", "num_outputs": 3},
        {"name": "d", "kind": "regression"},
        {"name": "e", "kind": "multilabel", "num_outputs": 3},
        {"name": "count", "kind": "regression"},
    ]
    dm = SyntheticImageDataModule(tasks, sources={"c": "shape"}, num_samples=100)
    assert dm.task_sources == {"a": "top", "b": "left", "c": "shape", "d": "size", "e": "shapes", "count": "count"}
    assert dm.num_kinds == 3  # the shape tasks have 3 classes: 3 kinds are drawn
    data = dm.generate()
    assert set(data.targets["c"].unique().tolist()) == {0, 1, 2} and data.targets["e"].shape == (100, 3)


def test_image_data_errors_name_the_task_and_the_fix() -> None:
    with pytest.raises(DataError, match="set its num_outputs: 3 or max_shapes: 4"):
        SyntheticImageDataModule([{"name": "count", "kind": "multiclass", "num_outputs": 4}])
    with pytest.raises(DataError, match=r"unknown sources \{'t': 'colour'\}"):
        SyntheticImageDataModule([{"name": "t", "kind": "binary"}], sources={"t": "colour"})
    with pytest.raises(DataError, match=r"tasks \['x'\] are not declared"):
        SyntheticImageDataModule([{"name": "t", "kind": "binary"}], sources={"x": "top"})
    with pytest.raises(DataError, match=r"task 'p' \(regression, num_outputs=3\) cannot read any source"):
        SyntheticImageDataModule([{"name": "p", "kind": "regression", "num_outputs": 3}])
    with pytest.raises(DataError, match="cannot read source 'top'"):
        SyntheticImageDataModule([{"name": "top", "kind": "regression"}])
    with pytest.raises(DataError, match="same num_outputs"):
        SyntheticImageDataModule(
            [
                {"name": "shape", "kind": "multiclass", "num_outputs": 3},
                {"name": "shapes", "kind": "multilabel", "num_outputs": 4},
            ]
        )
    with pytest.raises(DataError, match="channels must be 1"):
        SyntheticImageDataModule(IMAGE_TASKS, channels=2)


def test_image_data_missing_labels() -> None:
    data = SyntheticImageDataModule(IMAGE_TASKS, num_samples=1000, missing_rate=0.3).generate()
    assert 0.2 < float(data.targets["top"].isnan().float().mean()) < 0.4
    assert 0.2 < float((data.targets["shape"] == IGNORE_INDEX).float().mean()) < 0.4


def test_image_tasks_are_learnable_by_the_small_cnn() -> None:
    """A few epochs of a small CNN beat chance clearly on every task (plain loop: seconds on 2 CPU cores)."""
    torch.manual_seed(0)
    dm = SyntheticImageDataModule(IMAGE_TASKS[:3], num_samples=2000, batch_size=64)
    dm.setup("fit")
    encoder = SmallCNN(dm.input_shape, channels=[16, 32], fc_width=64)
    heads = nn.ModuleDict({"top": nn.Linear(64, 1), "shape": nn.Linear(64, 4), "count": nn.Linear(64, 3)})
    params = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    for _ in range(4):
        for batch in dm.train_dataloader():
            z, y = encoder(batch["inputs"]), batch["targets"]
            loss = F.binary_cross_entropy_with_logits(heads["top"](z).squeeze(-1), y["top"])
            loss = (
                loss + F.cross_entropy(heads["shape"](z), y["shape"]) + F.cross_entropy(heads["count"](z), y["count"])
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    encoder.eval()
    val = dm.datasets["val"]
    with torch.no_grad():
        z = encoder(val.inputs)
    accuracy = {
        "top": float(((heads["top"](z).squeeze(-1) > 0).float() == val.targets["top"]).float().mean()),
        "shape": float((heads["shape"](z).argmax(-1) == val.targets["shape"]).float().mean()),
        "count": float((heads["count"](z).argmax(-1) == val.targets["count"]).float().mean()),
    }
    assert accuracy["top"] > 0.85 and accuracy["shape"] > 0.5 and accuracy["count"] > 0.4, accuracy


# -------------------------------------------------------------------------------------------------------- CLI
def test_cli_fast_dev_run_with_cnn_on_images(tmp_path: Path) -> None:
    args = ["--model", str(CONFIGS / "model" / "cnn.yaml"), "--data", str(CONFIGS / "data" / "images.yaml")]
    cli = run_cli(["fit", "--config", str(QUICKSTART), *args, *QUIET_TRAINER, "--trainer.fast_dev_run", "2"], tmp_path)
    assert cli.trainer.state.finished
    encoder = cli.model.encoder
    assert isinstance(encoder, SmallCNN) and encoder.input_shape == (1, 28, 28)
    assert cli.model.task_names == ["top", "shape", "count", "position"]
    assert {"val/top/accuracy", "val/shape/accuracy", "val/position/loss"} <= set(cli.trainer.callback_metrics)
