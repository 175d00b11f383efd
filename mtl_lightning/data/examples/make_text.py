"""Write ``text_tiny/``: a made-up multi-task review table, its tokenizer and a tiny BERT config, for
``configs/experiment/text_hf_tiny.yaml`` (offline: nothing is downloaded).

Deterministic (fixed seed), so re-running it rewrites the same files::

    python mtl_lightning/data/examples/make_text.py [--rows 3000] [--out DIR]

``DIR/reviews.csv`` has a ``text`` column (a short product review) and three targets the words decide, so a
model can learn them:

- ``sentiment`` (binary 0/1): positive against negative opinion words.
- ``topic`` (multiclass, 4 string classes): the product words (food, travel, tech, sports).
- ``intensity`` (regression): how many intensifiers ("very", "really", ...) the review holds, standardised.

About 5% of each target's cells are empty (missing labels). ``DIR/tokenizer/`` is a word-level tokenizer
trained on the table (``[PAD]`` = 0, ``[UNK]``, ``[CLS]``, ``[SEP]``), saved with ``save_pretrained``;
``DIR/model/config.json`` a 2-layer BERT of width 32 (``pretrained: false`` builds it with random weights).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).resolve().parent / "text_tiny"
TOPICS = {
    "food": ["pizza", "coffee", "bread", "cheese", "soup", "cake", "tea", "pasta"],
    "travel": ["hotel", "flight", "train", "beach", "room", "tour", "airport", "cabin"],
    "tech": ["laptop", "phone", "screen", "battery", "charger", "keyboard", "camera", "router"],
    "sports": ["bike", "racket", "shoes", "ball", "helmet", "gloves", "tent", "skis"],
}
POSITIVE = ["great", "excellent", "lovely", "perfect", "good", "wonderful", "fantastic", "pleasant"]
NEGATIVE = ["awful", "terrible", "poor", "broken", "bad", "disappointing", "horrible", "useless"]
INTENSIFIERS = ["very", "really", "extremely", "truly", "incredibly"]
FILLER = ["the", "a", "this", "was", "is", "and", "it", "my", "for", "with", "we", "they", "our", "quite", "so"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def make_table(rows: int, seed: int = 0) -> pd.DataFrame:
    """The review table: ``text`` and the three targets (about 5% of each target missing)."""
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    topic = rng.integers(0, len(topics), rows)
    positive = rng.random(rows) < 0.5
    intensity = rng.integers(0, 4, rows)
    texts = []
    for t, pos, k in zip(topic, positive, intensity, strict=True):
        opinion = POSITIVE if pos else NEGATIVE
        words = list(rng.choice(FILLER, rng.integers(4, 9)))
        words += list(rng.choice(TOPICS[topics[t]], 2))
        words += list(rng.choice(opinion, 2))
        words += list(rng.choice(INTENSIFIERS, k))
        if rng.random() < 0.2:  # a word of the other opinion: sentiment is the majority, not any one word
            words.append(str(rng.choice(NEGATIVE if pos else POSITIVE)))
        rng.shuffle(words)
        texts.append(" ".join(words))
    frame = pd.DataFrame(
        {
            "text": texts,
            "sentiment": positive.astype(float),
            "topic": [topics[t] for t in topic],
            "intensity": np.round((intensity - intensity.mean()) / intensity.std(), 4),
        }
    )
    for col in ("sentiment", "topic", "intensity"):
        frame.loc[rng.random(rows) < 0.05, col] = None
    frame["sentiment"] = frame["sentiment"].astype("Int64")
    return frame


def write_tokenizer(texts: list[str], out: Path, special_tokens: list[str] = SPECIAL) -> int:
    """A word-level tokenizer trained on ``texts`` (lower-cased, split on whitespace and punctuation), wrapped as
    a ``transformers`` fast tokenizer that adds ``[CLS] ... [SEP]``; the special tokens take the first ids, in
    the order given. Returns its size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special_tokens))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.save_pretrained(str(out))
    return len(fast)


def write_model_config(vocab_size: int, out: Path) -> None:
    """A 2-layer BERT of width 32 with 64 positions: seconds per epoch on a CPU."""
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    config.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    table = make_table(args.rows)
    table.to_csv(args.out / "reviews.csv", index=False)
    size = write_tokenizer(table["text"].tolist(), args.out / "tokenizer")
    write_model_config(size, args.out / "model")
    print(f"wrote {args.rows} rows, a tokenizer of {size} ids and a model config to {args.out}")


if __name__ == "__main__":
    main()
