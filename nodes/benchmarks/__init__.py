"""Developer scripts that measure the pack (`python -m nodes.benchmarks.speed`); not tests."""
