"""Save the data's input encoding (columns, statistics, categories, class names) in every checkpoint.

The weights alone do not say how a record becomes a row: the standardisation and the one-hot vocabularies come
from the training split. With them in the checkpoint (``checkpoint["mtl_data_schema"]``), ``mtl serve`` and
``mtl export`` need neither the config nor the data to encode a request as training did. ``mtl fit`` adds this
callback to every run; a data module without named columns (synthetic tensors, images, token ids) gives no
schema, and nothing is written.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from mtl_lightning.contracts import HasInputSchema
from mtl_lightning.input_schema import CHECKPOINT_KEY


class InputSchemaCheckpoint(Callback):
    """Writes ``trainer.datamodule.input_schema`` (a :class:`~mtl_lightning.contracts.HasInputSchema`) into checkpoints."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        schema = datamodule.input_schema if isinstance(datamodule, HasInputSchema) else None
        if schema is not None:
            checkpoint[CHECKPOINT_KEY] = schema.to_dict()
