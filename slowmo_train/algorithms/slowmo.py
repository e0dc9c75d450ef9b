"""Placeholder: being written."""
from slowmo_train.algorithms.base import Algorithm


class SlowMo(Algorithm):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("SlowMo is not implemented yet")
