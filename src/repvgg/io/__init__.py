"""Layer 2, files: atomic writes, image files, the checkpoint formats users hold, and this package's own
checkpoints (float, INT8, and the training state ``last.pt``), each carrying the one model-info record.

Imports only ``repvgg.core`` and ``repvgg.exceptions``.
"""
