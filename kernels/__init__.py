"""fastgpt.kernels: fused attention, cross-entropy and per-token log-probs.

Placeholder during bootstrap; the public API is filled in by the kernel modules.
"""
