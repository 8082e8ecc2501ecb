"""Machinery that lossy passes share: calibration statistics, pruning, low-rank, precision policy."""
