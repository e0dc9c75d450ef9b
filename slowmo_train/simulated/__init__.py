"""The simulated cluster: one process plays N workers of any synchronous algorithm.

world.py      the ranks (threads taking turns) and the in-memory collectives they call
launcher.py   runs ``cli.worker_main`` as N ranks in this process (``launcher.simulate=N``)
cluster.py    what the real cluster would send and how long it would take (the analytic model)
"""
