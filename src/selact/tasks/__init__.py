"""Built-in tasks for :mod:`selact.train`: each module registers its task by name.

A new task module registers itself with ``@selact.train.register_task("name")`` and is imported
here by name, so the registry is complete once ``selact.tasks`` is imported.
"""

from selact.tasks import cifar10, voc  # noqa: F401  (register "cifar10", "voc")
