"""A checkpoint written before task kinds became plug-ins still loads and predicts the same."""

from __future__ import annotations

from pathlib import Path

import torch

from mtl_lightning import MultiTaskModule

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_a_checkpoint_of_the_earlier_code_loads_and_predicts_the_same() -> None:
    model = MultiTaskModule.load_from_checkpoint(FIXTURES / "pre_kinds.ckpt", map_location="cpu")
    expected = torch.load(FIXTURES / "pre_kinds_outputs.pt", weights_only=True)
    model.eval()
    with torch.no_grad():
        predictions = model.predict_step({"inputs": expected["inputs"]}, 0)
        logits = model(expected["inputs"])
    assert list(predictions) == ["purchase", "segment", "tags", "spend", "position"]
    for name, want in expected["predictions"].items():
        torch.testing.assert_close(predictions[name], want, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits[name], expected["logits"][name], rtol=0, atol=1e-6)
    assert {k: s.kind for k, s in model.tasks.items()} == {
        "purchase": "binary",
        "segment": "multiclass",
        "tags": "multilabel",
        "spend": "regression",
        "position": "regression",
    }
