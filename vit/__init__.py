"""vit: Vision Transformers on CIFAR-10 with PyTorch Lightning and Hydra."""
