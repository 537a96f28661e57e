"""Benchmark suites (quality, speed, denoise, memory, reliability, serving), written as records
(``storage.records``, docs/benchmarks.md §1.4). Above train/ and serve/: a suite may run either; ``eval/`` keeps the
pure metrics the suites and the training loop share."""
