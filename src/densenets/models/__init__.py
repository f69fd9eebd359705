"""The architectures: layers, DenseNet (1D/2D/3D), the zoo, backbones, RDNet, FC-DenseNet."""
