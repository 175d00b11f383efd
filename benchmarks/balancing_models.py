"""The models ``benchmarks/balancing.py`` times a training step of: its fixed MLP and three real ones.

- ``mlp``: ``MLPEncoder`` 64 -> 256, 256 (``--features``, ``--hidden``) and T binary linear heads, T from ``--tasks``;
  each task a noisy threshold of its own random projection (the benchmark's historical model).
- ``multimnist``: the model section of ``configs/experiment/multimnist_hps.yaml`` (LeNet-style ``SmallCNN``, both
  digits, each head 50 -> 50 -> 10, Adam), on 1x28x28 inputs as ``MultiMNISTDataModule.input_shape`` gives; T = 2.
- ``census``: the model section of ``configs/experiment/census_mmoe.yaml`` (``MMoE``, 8 experts of 4 units, towers
  of 8 units, Adam) on the 503 inputs the census data module encodes for group 1 (docs/datasets.md); T = 2. MMoE
  returns one representation per task, so every gradient method runs in parameter mode, as the config's own
  comment says (representation mode has no shared ``z`` there).
- ``resnet18``: ``ResNetEncoder(arch="resnet18")`` (``configs/model/resnet.yaml``) on 3 x ``--image-size``^2 images
  with T binary heads, T from ``--tasks``: a CelebA-like setting (40 binary attributes) for a GPU.

The real models take their encoder, task heads and optimizer from the experiment config, instantiated as the CLI
would (class_path + init_args, ``input_shape`` and the tasks as the data module gives them). Their inputs are
**synthetic, of the right shapes and label types** (random pixels and digits for MultiMNIST, standardised numbers
plus one-hot blocks for census), so the benchmark needs neither data set: a step's cost does not depend on the
values.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

REPO = Path(__file__).resolve().parents[1]
MULTIMNIST_CONFIG = REPO / "configs" / "experiment" / "multimnist_hps.yaml"
CENSUS_CONFIG = REPO / "configs" / "experiment" / "census_mmoe.yaml"
# Encoded census inputs of group 1 (income, never_married): docs/datasets.md's table. The data module computes it
# from the files, which may be absent here, so the benchmark states it.
CENSUS_GROUP1_INPUTS = 503
CENSUS_NUMERIC_INPUTS = 7  # census.NUMERIC: standardised; the rest are one-hot blocks


@dataclass
class BenchModel:
    """What one benchmark side needs to build a model: encoder, task specs, batches, optimizer, gradient mode."""

    name: str
    description: str
    make_encoder: Callable[[], nn.Module]
    tasks: list[Any]  # TaskSpec
    make_batches: Callable[[torch.Generator], list[dict[str, Any]]]
    make_optimizer: Callable[[Any], torch.optim.Optimizer]
    # "representation": gradient methods in their default mode; "parameter": the encoder has no shared z (MMoE).
    gradient_mode: str = "representation"
    batch_size: int = 256


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _model_section(config: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model.init_args, data.init_args)`` of an experiment config."""
    cfg = yaml.safe_load(config.read_text())
    return cfg["model"]["init_args"], cfg["data"]["init_args"]


def _encoder_from(model_args: dict[str, Any], input_shape: tuple[int, ...]) -> Callable[[], nn.Module]:
    """The encoder as the CLI builds it: its class_path and init_args, ``input_shape`` linked from the data."""
    spec = model_args["encoder"]
    cls, init = _import(spec["class_path"]), dict(spec.get("init_args") or {})
    return lambda: cls(input_shape=input_shape, **init)


def _optimizer_from(model_args: dict[str, Any]) -> Callable[[Any], torch.optim.Optimizer]:
    spec = model_args.get("optimizer") or {"class_path": "torch.optim.AdamW", "init_args": {}}
    cls, init = _import(spec["class_path"]), dict(spec.get("init_args") or {})
    return lambda params: cls(params, **init)


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def mlp_model(num_tasks: int, features: int, hidden: list[int], batch_size: int) -> BenchModel:
    from mtl_lightning.encoders.mlp import MLPEncoder
    from mtl_lightning.tasks import TaskSpec

    def batches(gen: torch.Generator, count: int = 8) -> list[dict[str, Any]]:
        directions = torch.randn(num_tasks, features, generator=gen)
        out = []
        for _ in range(count):
            x = torch.randn(batch_size, features, generator=gen)
            signal = x @ directions.T + 0.5 * torch.randn(batch_size, num_tasks, generator=gen)
            out.append({"inputs": x, "targets": {f"t{i}": (signal[:, i] > 0).float() for i in range(num_tasks)}})
        return out

    return BenchModel(
        "mlp",
        f"MLP {features}-{'-'.join(map(str, hidden))}, {num_tasks} binary linear heads, AdamW",
        lambda: MLPEncoder((features,), hidden=hidden),
        [TaskSpec(f"t{i}", "binary") for i in range(num_tasks)],
        batches,
        _adamw,
        batch_size=batch_size,
    )


def multimnist_model(batch_size: int | None = None) -> BenchModel:
    from mtl_lightning.data import multimnist

    model_args, data_args = _model_section(MULTIMNIST_CONFIG)
    # The data module's own resolution of `tasks: null` + task_defaults (both digits, heads 50 -> 50 -> 10); the
    # module itself cannot be built without MNIST's files.
    names = data_args.get("tasks") or list(multimnist.TASKS)
    tasks = multimnist._resolve_tasks(names, data_args.get("task_defaults") or {})
    shape = (1, multimnist.DIGIT, multimnist.DIGIT)
    size = batch_size or int(data_args["batch_size"])

    def batches(gen: torch.Generator, count: int = 4) -> list[dict[str, Any]]:
        return [
            {
                "inputs": torch.randn(size, *shape, generator=gen),
                "targets": {t.name: torch.randint(0, 10, (size,), generator=gen) for t in tasks},
            }
            for _ in range(count)
        ]

    return BenchModel(
        "multimnist",
        f"{MULTIMNIST_CONFIG.relative_to(REPO)}: SmallCNN, heads {tasks[0].head_hidden} -> 10, synthetic 1x28x28",
        _encoder_from(model_args, shape),
        tasks,
        batches,
        _optimizer_from(model_args),
        batch_size=size,
    )


def census_model(batch_size: int | None = None) -> BenchModel:
    from mtl_lightning.data import census

    model_args, data_args = _model_section(CENSUS_CONFIG)
    names = data_args.get("tasks") or list(census.GROUPS[int(data_args.get("group") or 1)])
    tasks = census._resolve_tasks(names, data_args.get("task_defaults") or {})
    inputs = CENSUS_GROUP1_INPUTS
    size = batch_size or int(data_args["batch_size"])

    def batches(gen: torch.Generator, count: int = 4) -> list[dict[str, Any]]:
        out = []
        for _ in range(count):
            numeric = torch.randn(size, CENSUS_NUMERIC_INPUTS, generator=gen)
            # One-hot blocks: about one column in 14 set, as 32 categorical columns over 496 encoded ones.
            onehot = (torch.rand(size, inputs - CENSUS_NUMERIC_INPUTS, generator=gen) < 32 / 496).float()
            targets = {t.name: torch.randint(0, 2, (size,), generator=gen).float() for t in tasks}
            out.append({"inputs": torch.cat([numeric, onehot], dim=1), "targets": targets})
        return out

    return BenchModel(
        "census",
        f"{CENSUS_CONFIG.relative_to(REPO)}: MMoE, towers {tasks[0].head_hidden}, synthetic {inputs} inputs",
        _encoder_from(model_args, (inputs,)),
        tasks,
        batches,
        _optimizer_from(model_args),
        gradient_mode="parameter",
        batch_size=size,
    )


def resnet18_model(num_tasks: int, image_size: int, batch_size: int | None = None) -> BenchModel:
    from mtl_lightning.encoders.resnet import ResNetEncoder
    from mtl_lightning.tasks import TaskSpec

    size = batch_size or 128
    shape = (3, image_size, image_size)

    def batches(gen: torch.Generator, count: int = 4) -> list[dict[str, Any]]:
        return [
            {
                "inputs": torch.randn(size, *shape, generator=gen),
                "targets": {f"t{i}": torch.randint(0, 2, (size,), generator=gen).float() for i in range(num_tasks)},
            }
            for _ in range(count)
        ]

    return BenchModel(
        "resnet18",
        f"ResNet-18 on synthetic 3x{image_size}x{image_size}, {num_tasks} binary linear heads, AdamW",
        lambda: ResNetEncoder(shape, arch="resnet18"),
        [TaskSpec(f"t{i}", "binary") for i in range(num_tasks)],
        batches,
        _adamw,
        batch_size=size,
    )


# Models whose task list is the experiment config's (``--tasks`` does not apply).
FIXED_TASKS = {"multimnist": 2, "census": 2}
MODELS = ("mlp", "multimnist", "census", "resnet18")


def build(name: str, num_tasks: int, args: Any) -> BenchModel:
    """The model ``--model name`` with ``num_tasks`` tasks (ignored where the config fixes them)."""
    if name == "mlp":
        return mlp_model(num_tasks, args.features, args.hidden, args.batch_size or 256)
    if name == "multimnist":
        return multimnist_model(args.batch_size)
    if name == "census":
        return census_model(args.batch_size)
    if name == "resnet18":
        return resnet18_model(num_tasks, args.image_size, args.batch_size)
    raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")
