"""The architectures: layers (H_l, transition), DenseNet, its named configurations, backbone."""
