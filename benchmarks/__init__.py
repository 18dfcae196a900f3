"""ftrans benchmarks: ftrans, torch.func and a Python loop side by side, in one process.

Run ``python -m benchmarks --help``.
"""
