"""Machinery that lossy passes share: calibration, layer-sensitivity ranking, quantization
(quant/), low-rank factorization (lowrank/). The passes stay thin files in iropt.passes.
Imports: iropt.infra and below, iropt.rewrite.
"""
