"""A trained ``MultiTaskModule`` loaded from its checkpoint file, for the tools around it (export, ensembles, serve).

Beyond ``load_from_checkpoint`` it attaches what those tools read from the file itself, because the module keeps
only plain hparams once built: ``saved_encoder_config`` (the encoder's config with its linked ``input_shape``) and
``saved_data_schema`` (the table's encoding, :mod:`mtl_lightning.input_schema`; None for tensor data).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtl_lightning.checkpoint_io import check_checkpoint, translate_load_error
from mtl_lightning.errors import ConfigError
from mtl_lightning.input_schema import CHECKPOINT_KEY
from mtl_lightning.module import MultiTaskModule


def load_trained(
    path: str | Path, error: type[ConfigError] = ConfigError, subject: str = "checkpoint"
) -> MultiTaskModule:
    """The model of checkpoint ``path`` on CPU in eval mode; a file that does not load raises one ``error`` line
    naming it as ``subject`` (e.g. ``"ensemble member"``)."""
    checked = check_checkpoint(path)  # missing, empty, truncated, not a checkpoint: one line naming the file
    if checked.is_dir():
        raise error(f"{subject} {str(path)!r} is a directory, not a checkpoint file; give FILE.ckpt")
    try:
        model = MultiTaskModule.load_from_checkpoint(checked, map_location="cpu")
    except ConfigError:
        raise
    except Exception as err:
        translated = translate_load_error(checked, err)
        if translated is not None:
            raise translated from None
        raise error(
            f"{subject} {str(path)!r} does not load as a MultiTaskModule checkpoint: {type(err).__name__}: {err}"
        ) from err
    # Memory-mapped, so that a large checkpoint is not read twice.
    saved = torch.load(checked, map_location="cpu", weights_only=True, mmap=True)
    # Plain attributes MultiTaskModule does not declare; nn.Module types undeclared ones as Tensor | Module.
    model.saved_encoder_config = (saved.get("hyper_parameters") or {}).get("encoder")  # type: ignore[assignment]
    model.saved_data_schema = saved.get(CHECKPOINT_KEY)
    return model.eval()
