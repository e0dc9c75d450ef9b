"""Launch recipes, benchmarks and the reproduction, run from the repository root with slowmo-train
installed (``pip install -e .``): ``python scripts/NAME.py ...``, or ``python -m scripts.NAME ...`` for
bench_streaming, bench_checkouts and bench_poll_overlap, which import the emulated-cluster runner
scripts/emulated_bench.py as ``scripts.emulated_bench`` (reproduce.py and bench_speed.py import their
helpers either way). What they share with the tests and the report tool is in
``slowmo_train/scripting.py``.
"""
