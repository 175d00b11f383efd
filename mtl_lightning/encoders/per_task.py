"""The base class of encoders with parts per task: it owns the task list, ``bind_tasks`` and ``out_features``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch.nn as nn
from torch import Tensor

from mtl_lightning.encoders._common import check_task_names, rebind, unbound


class PerTaskEncoder(nn.Module, ABC):
    """An encoder that returns ``{task: representation}`` and holds modules per task (gates, towers, columns).

    It implements :class:`~mtl_lightning.contracts.SupportsBindTasks` and :class:`~mtl_lightning.contracts.Encoder`
    for its subclasses, which only

    - set ``self.task_features`` (the width of every task's representation) in ``__init__`` and create their
      per-task containers there, empty (``nn.ModuleDict()``);
    - fill them for the bound tasks in :meth:`bind_parts`, usually with :meth:`per_task`, which keeps the modules
      of tasks that stay;
    - compute ``{task: representation}`` for ``self.task_names`` in :meth:`forward_tasks`.

    Example (a shared trunk and one linear tower per task; ``tests/test_contracts.py`` trains it)::

        class Towers(PerTaskEncoder):
            def __init__(self, input_shape: Sequence[int], width: int = 32):
                super().__init__()
                self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU())
                self.towers = nn.ModuleDict()
                self.task_features = width

            def bind_parts(self, names: list[str]) -> None:
                self.towers = self.per_task(self.towers, lambda _: nn.Linear(self.task_features, self.task_features))

            def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
                h = self.trunk(x)
                return {t: tower(h) for t, tower in self.towers.items()}
    """

    #: The width of every task's representation, set by the subclass (a class attribute here, so that a subclass
    #: may also make it a property).
    task_features: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.task_names: list[str] = []

    @property
    def owner(self) -> str:
        """The name that error messages start with: the class's own (``CGC``, ``PartialSharing``), not the base's."""
        return type(self).__name__

    def bind_tasks(self, names: Sequence[str]) -> None:
        """Learn the task names (checked, in the model's order) and keep the per-task parts in step with them."""
        self.task_names = check_task_names(self.owner, names)
        self.bind_parts(self.task_names)

    def bind_parts(self, names: list[str]) -> None:
        """Build the parts of new tasks, keep those of kept tasks, drop the others; reset per-task statistics.

        Called by :meth:`bind_tasks` after ``self.task_names`` is set to ``names``.
        """

    def per_task(self, current: nn.ModuleDict | None, build: Callable[[str], nn.Module]) -> nn.ModuleDict:
        """``current`` re-keyed to the bound tasks: kept tasks keep their modules, new ones get ``build(task)``.

        New modules go to the device and dtype of this encoder's parameters, so a task added to a model on a GPU
        trains there; assign the result back to the attribute that held ``current``.
        """
        return rebind(self, current, self.task_names, build)

    @property
    def out_features(self) -> dict[str, int]:
        """``{task: task_features}`` for the bound tasks; ``{}`` before :meth:`bind_tasks` has been called."""
        if self.task_names and self.task_features < 1:
            raise TypeError(f"{self.owner} must set self.task_features (its representation width) in __init__")
        return dict.fromkeys(self.task_names, self.task_features)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        # A clear error instead of an empty dict (or a KeyError in a head) when nothing has bound the tasks yet.
        if not self.task_names:
            raise unbound(self.owner)
        return self.forward_tasks(x)

    @abstractmethod
    def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
        """``{task: representation (N, task_features)}`` for every task of ``self.task_names``."""
