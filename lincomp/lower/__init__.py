"""Lowering: IR plans -> generated kernel source (Triton for GPUs, TVM TensorIR for CPUs)."""
