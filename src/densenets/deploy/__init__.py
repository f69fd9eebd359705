"""Models leaving the library: export (ONNX, TorchScript, torch.export) and prediction."""
