"""Memory-efficient dense blocks: one algorithm, the passes of each backend, their kernels."""
