"""Compression machinery used by lossy passes: calibration, quantization, low-rank factorization.

May import `iropt` layers below it (ir, io, verify, infra); never a pass, never a runtime.
"""
