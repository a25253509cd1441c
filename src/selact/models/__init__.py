"""Models by name: ``create_model("resnet20")``; ``list_models()`` lists what is registered.

``create_model("torchvision:resnet18")`` and ``create_model("timm:vit_tiny_patch16_224")`` build
torchvision and timm models by their own names.

Each model module registers its factories with ``@register_model`` and is imported here by
name, so the registry is complete once ``selact.models`` is imported.
"""

from selact.models import cifar_resnet, det, small_cnn, vgg, vit  # noqa: F401  (register "det", "small_cnn")  # noqa: F401  (resnet20/56, vgg16, vit)
from selact.models._registry import create_model, list_models, register_model
from selact.models.small_cnn import SmallCNN

__all__ = ["SmallCNN", "create_model", "list_models", "register_model"]
