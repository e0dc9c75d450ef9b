"""Asynchronous training with momentum: ASGD, NAG-ASGD, DANA-Zero and DANA-Slim (Hakimi et al.,
"Taming Momentum in a Distributed Asynchronous Environment", arXiv 1907.11612), run either by a
one-process simulator of N workers or by real parameter-server and worker processes.

    rules.py      master update rules (pure tensor math)    simulator.py  reproducible event order
    runner.py     AsyncRunner, the simulated loop              server.py     real mode over torch.distributed
    common.py     what both loops share: flat model, plan (plan.py), interval statistics, checkpoint file
"""

from slowmo_train.asynchronous.rules import RULES, AsyncRule, build_rule

__all__ = ["RULES", "AsyncRule", "build_rule"]
