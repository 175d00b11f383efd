"""``mtl serve``: per-task predictions over HTTP, on LitServe (see :mod:`mtl_lightning.serve.cli`).

The core never imports this package; it reads checkpoints and ONNX files and drives the model like ``mtl predict``.
"""
