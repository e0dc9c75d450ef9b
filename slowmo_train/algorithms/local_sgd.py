"""Placeholder: being written."""
from slowmo_train.algorithms.base import Algorithm


class LocalSGD(Algorithm):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("LocalSGD is not implemented yet")
