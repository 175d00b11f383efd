"""Loading Hugging Face models, configs and tokenizers by hub name or local folder, with one clear error each.

Shared by :class:`mtl_lightning.encoders.HFEncoder` and :class:`mtl_lightning.data.TextDataModule`. ``transformers``
is imported here on first use only: it takes seconds to import, and ``mtl --version`` or a run without text
should not pay for it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from mtl_lightning.errors import ConfigError

INSTALL_HINT = 'pip install "mtl_lightning[text]"'


def transformers_module(owner: str) -> ModuleType:
    """``transformers``, or a ConfigError saying how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise ConfigError(f"{owner} needs the transformers package: {INSTALL_HINT}") from err
    return transformers


def looks_like_a_path(name: str) -> bool:
    """Whether ``name`` is meant as a local folder (absolute, ``./``, ``../``, ``~``) rather than a hub name."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def load(loader: Any, name: str, owner: str, what: str, local_files_only: bool = False, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name, ...)`` (a transformers Auto class), its failures as one ConfigError.

    A local path that is not a folder fails at once, without a hub lookup; a hub name that cannot be fetched (no
    network, a typo, a private model) says how to point at a local copy instead.
    """
    path = Path(name).expanduser()
    if looks_like_a_path(name) and not path.is_dir():
        what_is_there = "is a file, not a folder" if path.exists() else "does not exist"
        raise ConfigError(
            f"{owner}: {what} {name!r} {what_is_there} (looked for {path.resolve()}); give a folder written by "
            "save_pretrained (config.json, weights, tokenizer files) or a Hugging Face hub name"
        )
    try:
        return loader.from_pretrained(str(path) if path.is_dir() else name, local_files_only=local_files_only, **kwargs)
    except (OSError, ValueError) as err:
        if path.is_dir():
            raise ConfigError(f"{owner}: could not load the {what} in the folder {name!r}: {err}") from err
        raise ConfigError(
            f"{owner}: could not load the {what} {name!r}: it is not a local folder and the Hugging Face hub did "
            "not give it (offline, a misspelt name, or a gated model). On a machine with access, download it "
            f"(`huggingface-cli download {name} --local-dir DIR`) and set the option to that DIR"
        ) from err
