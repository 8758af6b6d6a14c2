"""What the benchmarks in benchmarks/ share, one job per module: the repository's paths (repo), the
command-line flags several of them take with one meaning (cli), the one way they start and stop a server
(server), a closed-loop load on an in-process engine (engine_load), the kernel benchmarks' shapes and
timer (kernel_timing), and the side-by-side runs under `vllm bench serve` (side_by_side).

The benchmarks run as scripts (`.venv/bin/python benchmarks/NAME.py`), which puts benchmarks/ on sys.path,
so each imports `benchkit.<module>`; no benchmark imports another.
"""
