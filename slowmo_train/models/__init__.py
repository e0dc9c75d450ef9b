"""Plain nn.Modules, without distributed code."""

from slowmo_train.models.resnet import cifar_resnet18

MODELS = {"resnet18": cifar_resnet18}

__all__ = ["MODELS", "cifar_resnet18"]
