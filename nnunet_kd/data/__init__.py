"""Datasets: generated ones in nnU-Net raw format (for the demo and the tests), and held-out test sets split off a
real one."""
