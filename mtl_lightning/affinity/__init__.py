"""Task affinity and grouping (TAG): ``mtl affinity`` measures how a step on one task changes the others' losses
during one run and proposes groupings of the tasks (:mod:`mtl_lightning.affinity.grouping`).

The measurement itself is the callback :class:`mtl_lightning.callbacks.TaskAffinity`; this package is the tool
around it and imports no Lightning until a run is asked for.
"""

from mtl_lightning.affinity.grouping import MAX_TASKS, Proposal, best_partitions, group_score, set_partitions

__all__ = ["MAX_TASKS", "Proposal", "best_partitions", "group_score", "set_partitions"]
