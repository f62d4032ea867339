"""The CNN-transformer hybrid, its baselines, datasets, training, metrics and ONNX export.
Opens no sockets."""
