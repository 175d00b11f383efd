"""The data's ``vocab_size`` reaches a token encoder through the CLI link, like ``input_shape``: written once."""

from __future__ import annotations

import pytest
import yaml
from conftest import CONFIGS, build_cli

from mtl_lightning.errors import ConfigError
from mtl_lightning.lightning_cli import ENCODER_VOCAB_SIZE

TOKENS = ["--model", str(CONFIGS / "model" / "transformer.yaml"), "--data", str(CONFIGS / "data" / "sequences.yaml")]


def test_the_configs_write_vocab_size_once() -> None:
    model = yaml.safe_load((CONFIGS / "model" / "transformer.yaml").read_text())
    data = yaml.safe_load((CONFIGS / "data" / "sequences.yaml").read_text())
    assert "vocab_size" not in model["init_args"]["encoder"]["init_args"]
    assert data["init_args"]["vocab_size"] == 512


@pytest.mark.parametrize("vocab_size", [512, 300])
def test_the_data_vocab_size_reaches_the_encoder(vocab_size: int) -> None:
    cli = build_cli(*TOKENS, "--data.init_args.vocab_size", str(vocab_size))
    encoder = cli.model.encoder
    assert cli.datamodule.vocab_size == vocab_size
    assert encoder.vocab_size == vocab_size
    assert encoder.token_embedding.num_embeddings == vocab_size


def test_an_encoder_vocab_size_that_differs_from_the_data_is_refused() -> None:
    with pytest.raises(ConfigError, match=rf"{ENCODER_VOCAB_SIZE} is 300 but the data's vocab_size is 512"):
        build_cli(*TOKENS, f"--{ENCODER_VOCAB_SIZE}", "300")


def test_an_encoder_vocab_size_equal_to_the_data_is_accepted() -> None:
    # Configs written before the link (e.g. configs/experiment/transformer_gpu.yaml) give both, equal.
    cli = build_cli(*TOKENS, f"--{ENCODER_VOCAB_SIZE}", "512", "--data.init_args.vocab_size", "512")
    assert cli.model.encoder.vocab_size == 512


def test_encoders_and_data_without_a_vocab_size_are_left_alone() -> None:
    cli = build_cli()  # the quickstart: an MLP encoder and synthetic data, neither with a vocab_size
    assert not hasattr(cli.datamodule, "vocab_size")
    assert not hasattr(cli.model.encoder, "vocab_size")
    cli = build_cli("--data", str(CONFIGS / "data" / "sequences.yaml"), "--data.init_args.num_samples", "64")
    assert not hasattr(cli.model.encoder, "vocab_size")  # token data, an encoder that takes no vocab_size


def test_the_saved_config_leaves_the_linked_value_to_the_data() -> None:
    cli = build_cli(*TOKENS, "--data.init_args.vocab_size", "300")
    saved = yaml.safe_load(cli.parser.dump(cli.config))
    assert "vocab_size" not in saved["model"]["init_args"]["encoder"]["init_args"]
    assert saved["data"]["init_args"]["vocab_size"] == 300


def test_a_transformer_without_a_vocab_size_is_one_clear_error() -> None:
    from mtl_lightning.encoders import TransformerEncoder
    from mtl_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="vocab_size is not set; use a data module with a vocab_size"):
        TransformerEncoder((8,), None)  # type: ignore[arg-type]  # what the CLI passes when nothing links it
