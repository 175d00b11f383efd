"""``mtl sweep``: Optuna studies over config keys (task weights, learning rate, the balancer) with Pareto fronts.

:mod:`~mtl_lightning.sweep.space` (what is searched), :mod:`~mtl_lightning.sweep.spec` (the sweep file, checked),
:mod:`~mtl_lightning.sweep.storage` (where the study lives), :mod:`~mtl_lightning.sweep.runner` (workers and trials),
:mod:`~mtl_lightning.sweep.trial` (one trial's process), :mod:`~mtl_lightning.sweep.report` (CSV and figure),
:mod:`~mtl_lightning.sweep.cli` (the command). The sweep drives the CLI; the core never imports it.
"""
