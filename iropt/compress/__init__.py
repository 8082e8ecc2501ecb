"""Machinery that lossy passes share: calibration statistics, pruning, low-rank, precision policy.

May import iropt.ir/io/verify/infra; never the CLI, passes or back ends.
"""
