"""Text on Hugging Face models: TextDataModule (tokenising, dynamic padding, errors) and HFEncoder (pooling,
padding, loading, size checks), on tiny models and tokenizers the tests build: nothing is downloaded."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import CONFIGS, REPO, build_cli, mp_callback, mtl_subprocess

from mtl_lightning.data import DataError, TextDataModule, TokenDataset
from mtl_lightning.data.examples.make_text import SPECIAL, make_table, write_model_config, write_tokenizer
from mtl_lightning.encoders import HFEncoder
from mtl_lightning.errors import ConfigError

transformers = pytest.importorskip("transformers")

TASKS = [
    {"name": "sentiment", "kind": "binary"},
    {"name": "topic", "kind": "multiclass", "num_outputs": 4},
    {"name": "intensity", "kind": "regression"},
]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A review table of 300 rows, its tokenizer and a tiny BERT config, as make_text writes them."""
    out = tmp_path_factory.mktemp("text")
    table = make_table(300, seed=1)
    table.to_csv(out / "reviews.csv", index=False)
    size = write_tokenizer(table["text"].tolist(), out / "tokenizer")
    write_model_config(size, out / "model")
    return out


def data(text_dir: Path, **kwargs: object) -> TextDataModule:
    args: dict = {"path": str(text_dir / "reviews.csv"), "tokenizer": str(text_dir / "tokenizer"), "tasks": TASKS}
    return TextDataModule(**{**args, **kwargs})  # type: ignore[arg-type]


def encoder(text_dir: Path, **kwargs: object) -> HFEncoder:
    args: dict = {"input_shape": (32,), "model_name_or_path": str(text_dir / "model"), "pretrained": False}
    return HFEncoder(**{**args, **kwargs})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ data module
def test_rows_are_the_tokenizers_ids_and_batches_are_padded_to_their_longest_row(text_dir: Path) -> None:
    dm = data(text_dir, max_length=40, shuffle=False)
    train = dm.datasets["train"]
    assert isinstance(train, TokenDataset) and train.inputs.shape[1] == 40
    texts = pd.read_csv(text_dir / "reviews.csv")["text"].iloc[dm.split_rows["train"]].tolist()
    expected = dm.tokenizer(texts[:8])["input_ids"]
    batch = train.__getitems__(list(range(8)))
    longest = max(len(ids) for ids in expected)
    assert batch["inputs"].shape == (8, longest)  # not max_length: this batch's longest row
    for row, ids in zip(batch["inputs"].tolist(), expected, strict=True):
        assert row == ids + [dm.pad_id] * (longest - len(ids))
    assert dm.vocab_size == len(dm.tokenizer) and dm.pad_id == SPECIAL.index("[PAD]")
    assert dm.class_names["topic"] == ["food", "sports", "tech", "travel"]  # the tabular module's targets
    assert dm.input_shape == (40,)


def test_subsets_keep_the_dynamic_padding(text_dir: Path) -> None:
    train = data(text_dir).datasets["train"]
    part = train.subset(torch.arange(4))
    assert isinstance(part, TokenDataset)
    assert part.__getitems__([0, 1, 2, 3])["inputs"].shape[1] < train.inputs.shape[1]


def test_sentence_pairs_are_joined_by_the_tokenizer(text_dir: Path, tmp_path: Path) -> None:
    table = pd.read_csv(text_dir / "reviews.csv")
    table["second"] = table["text"].str.split().str[0]
    table.to_csv(tmp_path / "pairs.csv", index=False)
    dm = data(text_dir, path=str(tmp_path / "pairs.csv"), text_pair_column="second", max_length=40)
    first = dm.datasets["train"].inputs[0].tolist()
    sep = dm.tokenizer.sep_token_id
    assert first.count(sep) == 2 and first[0] == dm.tokenizer.cls_token_id


def test_long_texts_are_truncated_or_refused_by_row(text_dir: Path) -> None:
    assert data(text_dir, max_length=6).datasets["train"].inputs.shape[1] == 6
    with pytest.raises(DataError, match=r"tokenise to more than max_length=6 tokens .*set truncation: true"):
        _ = data(text_dir, max_length=6, truncation=False).datasets


def test_a_missing_or_empty_text_column_is_named(text_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"lacks feature columns \['body'\]"):
        _ = data(text_dir, text_column="body").datasets
    table = pd.read_csv(text_dir / "reviews.csv")
    table["text"] = None
    table.to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(DataError, match=r"text column 'text' .* is empty in every row"):
        _ = data(text_dir, path=str(tmp_path / "empty.csv")).datasets


def test_tabular_feature_options_are_refused(text_dir: Path) -> None:
    with pytest.raises(DataError, match="not features: remove features"):
        data(text_dir, features=["text"])


def test_a_tokenizer_that_cannot_be_loaded_says_how_to_point_at_a_copy(text_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tokenizer '\./nowhere' does not exist"):
        _ = data(text_dir, tokenizer="./nowhere").tokenizer
    with pytest.raises(ConfigError, match=r"not a local folder .*huggingface-cli download some-org/no-such-model"):
        _ = data(text_dir, tokenizer="some-org/no-such-model", local_files_only=True).tokenizer


# ---------------------------------------------------------------------------------------------------- encoder
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_changes_no_output(text_dir: Path, pooling: str) -> None:
    torch.manual_seed(0)
    enc = encoder(text_dir, pooling=pooling).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 3, 0, 0]])
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        out, out_padded = enc(ids), enc(padded)
        # Row 1 alone, unpadded: what the model gives the same text in a batch of its own.
        alone = enc(ids[1:, :3])
    assert out.shape == (2, enc.out_features)
    torch.testing.assert_close(out, out_padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_every_parameter_gets_a_gradient(text_dir: Path, pooling: str) -> None:
    # DDP stops at the first step on a parameter the loss does not reach (BERT's pooler, unless dropped).
    enc = encoder(text_dir, pooling=pooling)
    enc(torch.tensor([[2, 10, 11, 3, 0]])).square().sum().backward()
    # The embedding rows of ids not in the batch get zero gradients, but a gradient: DDP needs only that.
    assert [n for n, p in enc.named_parameters() if p.grad is None] == []


def test_pooling_reads_the_models_hidden_states(text_dir: Path) -> None:
    torch.manual_seed(0)
    cls, mean = encoder(text_dir, pooling="cls").eval(), encoder(text_dir, pooling="mean").eval()
    mean.load_state_dict(cls.state_dict())
    ids = torch.tensor([[2, 10, 11, 3, 0]])
    with torch.no_grad():
        hidden = cls.model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state[0]
        torch.testing.assert_close(cls(ids)[0], hidden[0])
        torch.testing.assert_close(mean(ids)[0], hidden[:4].mean(dim=0))


def test_pretrained_weights_are_loaded_from_a_folder(text_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    random = encoder(text_dir).eval()
    random.model.save_pretrained(tmp_path / "saved")
    loaded = encoder(text_dir, model_name_or_path=str(tmp_path / "saved"), pretrained=True).eval()
    ids = torch.tensor([[2, 10, 11, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), random(ids))


def test_random_weights_embed_exactly_the_tokenizers_ids(text_dir: Path) -> None:
    enc = encoder(text_dir, vocab_size=50, config_overrides={"num_hidden_layers": 1})
    assert enc.vocab_size == enc.embedded == 50
    assert len(enc.fsdp_units()) == 1 and type(enc.fsdp_units()[0]).__name__ == "BertLayer"


def test_size_mismatches_are_refused_with_the_fix(text_dir: Path, tmp_path: Path) -> None:
    encoder(text_dir).model.save_pretrained(tmp_path / "saved")
    saved = str(tmp_path / "saved")
    with pytest.raises(ConfigError, match=r"the tokenizer has 500 ids but the model .* embeds \d+"):
        encoder(text_dir, model_name_or_path=saved, pretrained=True, vocab_size=500)
    with pytest.raises(ConfigError, match="max_length is 100 but the model has 64 positions"):
        encoder(text_dir, input_shape=(100,))
    with pytest.raises(ConfigError, match=r"config_overrides names keys that BertConfig does not have: \['layers'\]"):
        encoder(text_dir, config_overrides={"layers": 2})
    with pytest.raises(ConfigError, match="pooling must be one of"):
        encoder(text_dir, pooling="max")
    with pytest.raises(ConfigError, match="input_shape must be"):
        encoder(text_dir, input_shape=(3, 8, 8))


def test_float_inputs_are_refused(text_dir: Path) -> None:
    with pytest.raises(TypeError, match="expects integer token ids"):
        encoder(text_dir)(torch.zeros(2, 5))


# -------------------------------------------------------------------------------------------------------- CLI
def test_the_cli_links_the_tokenizers_size_and_padding_into_the_encoder(tmp_path: Path) -> None:
    # A tokenizer whose padding id is not 0: a default would silently attend to padding.
    table = make_table(200, seed=2)
    table.to_csv(tmp_path / "reviews.csv", index=False)
    order = ["[UNK]", "[CLS]", "[SEP]", "[PAD]"]
    size = write_tokenizer(table["text"].tolist(), tmp_path / "tokenizer", special_tokens=order)
    cli = build_cli(
        *("--model", str(CONFIGS / "model" / "hf.yaml"), "--data", str(CONFIGS / "data" / "text.yaml")),
        *("--data.init_args.path", str(tmp_path / "reviews.csv")),
        *("--data.init_args.tokenizer", str(tmp_path / "tokenizer")),
    )
    enc = cli.model.encoder
    assert isinstance(enc, HFEncoder)
    assert enc.pad_id == 3 == cli.datamodule.pad_id
    assert enc.vocab_size == enc.embedded == size


def test_the_data_path_benchmark_reports_its_ratio(capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("text_data_path", REPO / "benchmarks" / "text_data_path.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--rows", "200", "--rounds", "1", "--steps", "2", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert "200 rows" in out and re.search(r"batch / step: median \d+\.\d+", out), out


# ------------------------------------------------------------------------------------------------------- DDP
DETERMINISTIC = """
model:
  init_args:
    encoder: {init_args: {config_overrides: {hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}}}
    optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1}}
data:
  init_args: {shuffle: false}
trainer:
  max_epochs: 2
  limit_train_batches: 6
  limit_val_batches: 2
  enable_progress_bar: false
  enable_model_summary: false
"""


@pytest.mark.integration  # two CLI runs in subprocesses, one of them 2 processes (~40 s on 2 CPU cores)
def test_ddp_on_text_equals_one_process(tmp_path: Path) -> None:
    # Each rank pads its half of a batch to that half's longest row, one process pads the whole batch: padding is
    # masked, so the two must train the same weights.
    (tmp_path / "deterministic.yaml").write_text(DETERMINISTIC)
    weights = {}
    for run, extra in {
        "single": ["--data.init_args.batch_size", "64"],
        "ddp": ["--trainer", str(CONFIGS / "trainer" / "ddp_cpu.yaml"), "--data.init_args.batch_size", "32"],
    }.items():
        root = tmp_path / run
        args = ["fit", "--config", str(CONFIGS / "experiment" / "text_hf_tiny.yaml")]
        args += ["--config", str(tmp_path / "deterministic.yaml"), *extra]
        args += ["--trainer.logger.init_args.save_dir", str(root), *mp_callback("DumpRun", out=str(root / "dump"))]
        proc = mtl_subprocess(args)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        weights[run] = torch.load(root / "dump" / "weights.pt", weights_only=True)
    single, ddp = weights["single"], weights["ddp"]
    assert single.keys() == ddp.keys()
    diff = max((single[k].double() - ddp[k].double()).abs().max().item() for k in single)
    assert diff <= 1e-5, f"DDP differs from one process by {diff:.3g}"
    assert any(k.startswith("encoder.model.") for k in single)
