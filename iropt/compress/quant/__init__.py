"""Quantization: scale/zero-point parameters, placement (what to quantize), the Q/DQ rewrite
and dynamic quantization. Imports: iropt.compress and below.
"""
