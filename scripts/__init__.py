"""Launch recipes, benchmarks and the reproduction, run from the repository root with slowmo-train
installed (``pip install -e .``): ``python scripts/NAME.py ...``, or ``python -m scripts.NAME ...`` for
the ones that import another script (bench_streaming and bench_poll_overlap use bench_speed). What
they share with the tests and the report tool is in ``slowmo_train/scripting.py``.
"""
