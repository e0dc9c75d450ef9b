"""slowmo-train: SlowMo distributed training (Wang et al., ICLR 2020, arXiv 1910.00643)."""

__version__ = "0.1.0"
