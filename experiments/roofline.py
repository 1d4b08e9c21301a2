"""`python -m experiments.roofline [--config.hardware=gb200] [--config.isls=...] [--config.batches=...]`: the
roofline study (blog Table 1).

The same as `python -m experiments.simulate --config=configs/simulate.py:roofline`, with the same fields:
T_compute/T_prefetch and T_DEP/T_DWDP per MoE layer over ISL and batch, the crossover ISL, and the distance to the
four published ratios. Writes results/roofline/<run>.json.
"""

from experiments import simulate

if __name__ == "__main__":
    simulate.run_main("roofline")
