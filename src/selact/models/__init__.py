"""Models by name: ``create_model("small_cnn")``; ``list_models()`` lists what is registered.

Each model module registers its factories with ``@register_model`` and is imported here by
name, so the registry is complete once ``selact.models`` is imported.
"""

from selact.models import det, small_cnn  # noqa: F401  (register "det", "small_cnn")
from selact.models._registry import create_model, list_models, register_model
from selact.models.small_cnn import SmallCNN

__all__ = ["SmallCNN", "create_model", "list_models", "register_model"]
