"""``python -m mtl_lightning fit --config configs/quickstart.yaml`` works like ``mtl``."""

from mtl_lightning.cli import main

if __name__ == "__main__":
    main()
