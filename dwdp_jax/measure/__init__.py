"""Measurement apart from the product: GPU timing and calibration helpers (`gpu_bench`) and the block
configurations the benchmarks sweep (`kernel_sweeps`). Imported by `experiments/` and the tests, never by the
runtime, the kernels or the model (tests/test_layering.py holds that)."""
