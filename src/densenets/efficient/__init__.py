"""Memory-efficient dense blocks: the autograd function, its passes, and their CPU kernels."""
