"""The reproduction of the paper's comparisons that scripts/reproduce.py runs and reports:

plan.py      what runs: the sets, their methods, seeds and shared overrides, each run's command
verdicts.py  a set's finished runs, statistics over seeds, whether a claim reproduces
report.py    the Markdown region of docs/RESULTS.md and its plots
plots.py     the report's plots: training curves per set, the sweep's heat map
"""
