"""Placeholder: being written."""
from slowmo_train.algorithms.base import Algorithm


class SGP(Algorithm):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("SGP is not implemented yet")


class OSGP(Algorithm):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("OSGP is not implemented yet")
