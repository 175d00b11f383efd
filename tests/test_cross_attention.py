"""CrossTaskAttention: each task's features attend over every task's; the weights are logged per task pair."""

from __future__ import annotations

import pytest
import torch

from mtl_lightning.encoders import CrossTaskAttention
from mtl_lightning.errors import ConfigError

TASKS = ["ta", "tb", "tc"]


def build(**kwargs: object) -> CrossTaskAttention:
    torch.manual_seed(0)
    encoder = CrossTaskAttention((6,), hidden=[8], num_heads=2, **kwargs)  # type: ignore[arg-type]
    encoder.bind_tasks(TASKS)
    return encoder


def test_each_task_is_its_projection_plus_the_attention_over_all_tasks() -> None:
    encoder = build().eval()
    x = torch.randn(5, 6)
    out = encoder(x)
    h = encoder.trunk(x)
    p = torch.stack([encoder.projections[t](h) for t in TASKS], dim=1)
    # torch's own multi-head attention with the encoder's weights: the same computation, written independently.
    attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        attn.in_proj_weight.copy_(torch.cat([encoder.query.weight, encoder.key.weight, encoder.value.weight]))
        attn.in_proj_bias.copy_(torch.cat([encoder.query.bias, encoder.key.bias, encoder.value.bias]))
        attn.out_proj.load_state_dict(encoder.out.state_dict())
    mixed, _ = attn.eval()(p, p, p)
    expected = encoder.norm(p + mixed)
    for i, t in enumerate(TASKS):
        torch.testing.assert_close(out[t], expected[:, i])


def test_one_tasks_loss_reaches_every_tasks_projection() -> None:
    # The point of the architecture: task a reads b and c, so a's loss trains their projections too.
    encoder = build()
    encoder(torch.randn(4, 6))["ta"].square().sum().backward()
    for t in TASKS:
        assert encoder.projections[t].weight.grad.abs().sum() > 0, t


def test_without_self_a_task_gives_itself_no_weight_and_the_rows_sum_to_one() -> None:
    encoder = build(include_self=False).train()
    encoder(torch.randn(16, 6))
    logs = encoder.training_logs()
    assert set(logs) == {f"attention/{t}/{s}" for t in TASKS for s in TASKS}
    for t in TASKS:
        assert float(logs[f"attention/{t}/{t}"]) == 0.0
        assert sum(float(logs[f"attention/{t}/{s}"]) for s in TASKS) == pytest.approx(1.0, abs=1e-6)


def test_rebinding_keeps_the_kept_tasks_projections() -> None:
    encoder = build()
    kept = encoder.projections["tb"]
    encoder.bind_tasks(["tb", "td"])
    assert encoder.projections["tb"] is kept and list(encoder.projections) == ["tb", "td"]
    assert set(encoder(torch.randn(2, 6))) == {"tb", "td"}


def test_bad_options_are_one_config_error() -> None:
    with pytest.raises(ConfigError, match=r"num_heads \(3\) must divide the last hidden width \(8\)"):
        CrossTaskAttention((6,), hidden=[8], num_heads=3)
    encoder = CrossTaskAttention((6,), hidden=[8], num_heads=2, include_self=False)
    with pytest.raises(ConfigError, match="include_self: false lets a task read only the other tasks"):
        encoder.bind_tasks(["only"])
