"""Task heads and the MLP encoder: output shapes, layer structure, custom classes and bad options."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mtl_lightning.encoders import MLPEncoder
from mtl_lightning.heads import MLPHead, build_head
from mtl_lightning.tasks import TaskSpec


def linears(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


# ------------------------------------------------------------------------------------------------- heads
def test_mlp_head_linear():
    head = MLPHead(16, 3)
    assert linears(head) == [(16, 3)]
    assert head(torch.randn(5, 16)).shape == (5, 3)


def test_mlp_head_hidden_and_dropout():
    head = MLPHead(16, 2, hidden=[8, 4], dropout=0.3)
    assert linears(head) == [(16, 8), (8, 4), (4, 2)]
    assert sum(isinstance(m, nn.ReLU) for m in head.modules()) == 2
    dropouts = [m for m in head.modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in dropouts] == [0.3, 0.3]
    assert head(torch.randn(5, 16)).shape == (5, 2)
    assert not any(isinstance(m, nn.Dropout) for m in MLPHead(16, 2, hidden=[8]).modules())


@pytest.mark.parametrize(
    ("spec", "out"),
    [
        (TaskSpec("b", "binary"), 1),
        (TaskSpec("m", "multiclass", num_outputs=7), 7),
        (TaskSpec("l", "multilabel", num_outputs=4), 4),
        (TaskSpec("r", "regression"), 1),
        (TaskSpec("r", "regression", num_outputs=3), 3),
    ],
    ids=lambda v: f"{v.kind}-{v.num_outputs}" if isinstance(v, TaskSpec) else str(v),
)
def test_build_head_output_width(spec, out):
    head = build_head(spec, 12)
    assert isinstance(head, MLPHead)
    assert linears(head) == [(12, out)]
    assert head(torch.randn(6, 12)).shape == (6, out)


def test_build_head_uses_spec_hidden_and_dropout():
    spec = TaskSpec("m", "multiclass", num_outputs=5, head_hidden=[32, 16], head_dropout=0.1)
    head = build_head(spec, 64)
    assert linears(head) == [(64, 32), (32, 16), (16, 5)]
    assert [m.p for m in head.modules() if isinstance(m, nn.Dropout)] == [0.1, 0.1]
    assert head(torch.randn(3, 64)).shape == (3, 5)


def test_custom_head_by_dotted_path():
    spec = TaskSpec("r", "regression", num_outputs=2, head="torch.nn.Linear", head_args={"bias": False})
    head = build_head(spec, 10)
    assert type(head) is nn.Linear
    assert (head.in_features, head.out_features) == (10, 2)
    assert head.bias is None
    assert head(torch.randn(4, 10)).shape == (4, 2)


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("torch.nn.NoSuchHead", r"task 'r': head 'torch.nn.NoSuchHead' could not be imported"),
        ("nosuchpackage_xyz.Head", r"task 'r': head 'nosuchpackage_xyz.Head' could not be imported"),
        ("Linear", r"task 'r': head 'Linear' is neither a known short name nor a dotted path"),
    ],
)
def test_custom_head_bad_path(path, match):
    with pytest.raises(ValueError, match=match):
        build_head(TaskSpec("r", "regression", head=path), 10)


def test_custom_head_bad_args():
    spec = TaskSpec("r", "regression", head="torch.nn.Linear", head_args={"nope": 1})
    with pytest.raises(TypeError, match="nope"):
        build_head(spec, 10)


# ---------------------------------------------------------------------------------------------- encoder
def test_mlp_encoder_flat_input():
    enc = MLPEncoder(input_shape=(20,), hidden=[32, 16])
    assert enc.in_features == 20
    assert enc.out_features == 16
    assert linears(enc) == [(20, 32), (32, 16)]
    assert not any(isinstance(m, nn.Flatten) for m in enc.modules())
    assert enc(torch.randn(7, 20)).shape == (7, 16)


def test_mlp_encoder_default_widths():
    enc = MLPEncoder(input_shape=[8])
    assert enc.out_features == 256
    assert linears(enc) == [(8, 256), (256, 256)]


def test_mlp_encoder_flattens_multi_dim_input():
    enc = MLPEncoder(input_shape=(3, 4, 5), hidden=[10])
    assert enc.in_features == 60
    assert linears(enc) == [(60, 10)]
    x = torch.randn(2, 3, 4, 5)
    z = enc(x)
    assert z.shape == (2, 10)
    # Flattening is row-major, exactly what reshape(N, -1) gives.
    first = enc.net[1]
    torch.testing.assert_close(z, torch.relu(first(x.reshape(2, -1))))


@pytest.mark.parametrize(("norm", "cls"), [("batch", nn.BatchNorm1d), ("layer", nn.LayerNorm), ("none", None)])
@pytest.mark.parametrize(
    ("activation", "act_cls"), [("relu", nn.ReLU), ("gelu", nn.GELU), ("silu", nn.SiLU), ("tanh", nn.Tanh)]
)
def test_mlp_encoder_norm_and_activation(norm, cls, activation, act_cls):
    enc = MLPEncoder(input_shape=(6,), hidden=[8, 4], norm=norm, activation=activation, dropout=0.2)
    kinds = [type(m) for m in enc.net]
    block = [nn.Linear, *([cls] if cls else []), act_cls, nn.Dropout]
    assert kinds == block * 2
    if cls is not None:
        norms = [m for m in enc.net if isinstance(m, cls)]
        assert [n.normalized_shape[0] if cls is nn.LayerNorm else n.num_features for n in norms] == [8, 4]
    assert enc(torch.randn(5, 6)).shape == (5, 4)


def test_mlp_encoder_no_dropout_layers_by_default():
    assert not any(isinstance(m, nn.Dropout) for m in MLPEncoder(input_shape=(6,), hidden=[8]).modules())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm": "group"}, r"norm must be one of \['none', 'batch', 'layer'\].*norm='group'"),
        (
            {"activation": "sigmoid"},
            r"activation one of \['relu', 'gelu', 'silu', 'tanh'\].*activation='sigmoid'",
        ),
        ({"hidden": []}, r"needs at least one hidden width"),
        ({"hidden": [8, 0]}, r"hidden widths must be >= 1, got \[8, 0\]"),
    ],
)
def test_mlp_encoder_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLPEncoder(input_shape=(6,), **kwargs)


def test_encoder_and_head_compose():
    enc = MLPEncoder(input_shape=(2, 3), hidden=[8])
    head = build_head(TaskSpec("m", "multiclass", num_outputs=4, head_hidden=[5]), enc.out_features)
    out = head(enc(torch.randn(9, 2, 3)))
    assert out.shape == (9, 4)
    out.sum().backward()
    assert all(p.grad is not None for p in [*enc.parameters(), *head.parameters()])
