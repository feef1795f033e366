"""Layer 5, studies built from the layers below: the speed and memory benchmark, the ablations of Tables 6
and 7 (with their ResNet-like baseline), PSPNet segmentation, the INT8 workflow and the demo.
"""
