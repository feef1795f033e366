"""Layer 1, the model core: fusion math, blocks, the RepVGG network and its backbone, the registry of named
models, whole-network re-parameterization and its check, the model-info record and the INT8 graph build.

Pure ``torch.nn``: nothing here reads or writes files, parses flags or knows about datasets. Imports only
``repvgg.exceptions`` and other core modules.
"""
