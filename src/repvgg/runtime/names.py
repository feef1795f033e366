"""The names of the runtime's choices, without torch, so that the command line offers them at start-up."""

from __future__ import annotations

import re

BACKENDS = ("eager", "inductor", "onnxruntime")
BACKEND_CHOICES = ("auto", *BACKENDS)
#: Numeric precisions ``optimize`` can run a model in; ``auto`` picks the fastest that keeps accuracy.
PRECISIONS = ("fp32", "bf16", "int8")
PRECISION_CHOICES = ("auto", *PRECISIONS)
EXPORT_TARGETS = ("onnx", "torchscript")
#: The file suffixes of each export target; the first is the usual one.
EXPORT_SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".ts", ".pth", ".torchscript")}
OUTPUT_FORMATS = ("repvgg", "official", "timm")  # key names a converted checkpoint can be written in
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")  # what a `device` parameter may say
