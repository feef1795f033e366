"""Layer 4, the training engine: datasets, distributed set-up, evaluation, and the one Trainer (one loop,
one learning-rate schedule, one checkpoint/resume path) that classification, segmentation and QAT share.

Imports the layers below (core, io, runtime) and ``repvgg.exceptions``.
"""
