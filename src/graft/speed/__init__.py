"""Run-time speed on the machine at hand: precision, BatchNorm folding, compilation, memory."""
