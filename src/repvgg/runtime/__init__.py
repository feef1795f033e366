"""Layer 3, running trained networks: convert and verify checkpoints, export (ONNX, TorchScript), choose the
fastest backend (``optimize``), predict image files, count and time.

Imports ``repvgg.core``, ``repvgg.io`` and ``repvgg.exceptions``; never the training engine.
"""
