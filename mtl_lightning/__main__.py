"""``python -m mtl_lightning fit --config configs/quickstart.yaml`` works like ``mtl`` (same one-line errors)."""

from mtl_lightning.cli import console_main

if __name__ == "__main__":
    console_main()
