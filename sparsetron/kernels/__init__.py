"""Attention and communication kernels: a torch reference for each op (CPU, CI) and fast GPU backends."""
