"""Machinery that lossy passes share: calibration, layer-sensitivity ranking, quantization
(quant/), the float16 policy (fp16/), low-rank factorization (lowrank/). The passes stay thin
files in iropt.passes. Imports: iropt.infra and below, iropt.rewrite.
"""
