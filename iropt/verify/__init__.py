"""Verification: criteria, feeds, the pure-numpy comparison, ONNX Runtime sessions and the
Verifier. Imports: iropt.io, iropt.ir and below (the only core layer that runs ONNX Runtime).
"""
