"""INT8 on the deployed A0: torch's FX x86 path (``repvgg quantize``) vs torchao's PT2E
``X86InductorQuantizer`` with TorchInductor, beside eager float32, timed interleaved in one process.

torchao is not a dependency of this package: ``pip install torchao`` first (measured with 0.18.0).

    python benchmarks/int8_pt2e_vs_fx.py --image-size 224 --batch-size 16 --in-chans 3 --classes 1000
    python benchmarks/int8_pt2e_vs_fx.py --image-size 28 --batch-size 64 --in-chans 1 --classes 10 \
        --repeats 20
"""

from __future__ import annotations

import argparse
import time

import torch

from repvgg import create_model, randomize_batchnorm_, reparameterize
from repvgg.core.int8 import quantize_ptq
from repvgg.io.machine import cpu_features, int8_activation_bits
from repvgg.runtime.device import device_name
from repvgg.runtime.measure import time_interleaved


def pt2e_int8(deployed: torch.nn.Module, calibration: list[torch.Tensor]) -> torch.nn.Module:
    """torchao's PT2E flow: export, prepare with the x86 Inductor quantizer, calibrate, convert, compile."""
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = torch.export.export(deployed, (calibration[0],)).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    for batch in calibration:
        prepared(batch)
    inductor_config.freezing = True
    return torch.compile(convert_pt2e(prepared))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    try:
        import torchao
    except ImportError:
        parser.error("torchao is not installed: pip install torchao")
    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=args.classes, in_chans=args.in_chans).eval()
    randomize_batchnorm_(model)
    shape = (args.batch_size, args.in_chans, args.image_size, args.image_size)
    calibration = [torch.randn(shape) for _ in range(args.calib_batches)]  # export fixes the batch size
    example = torch.randn(shape)
    deployed = reparameterize(model)
    bits = int8_activation_bits()
    fx = quantize_ptq(model, calibration, activation_bits=bits)
    start = time.perf_counter()
    with torch.no_grad():
        pt2e = pt2e_int8(deployed, calibration)
        pt2e(example)
    built = time.perf_counter() - start
    with torch.inference_mode():
        reference = deployed(example)
        errors = {
            name: float((runner(example) - reference).norm() / reference.norm())
            for name, runner in (("FX x86", fx), ("PT2E + inductor", pt2e))
        }
        measured = time_interleaved(
            {"eager fp32": deployed, "FX x86 INT8": fx, "PT2E + inductor INT8": pt2e},
            example,
            rounds=args.repeats,
        )
    print(
        f"{device_name(torch.device('cpu'))}; torchao {torchao.__version__}; batch {args.batch_size}, "
        f"{args.in_chans}x{args.image_size}x{args.image_size}; {bits}-bit activations; PT2E built and "
        f"compiled in {built:.1f} s"
    )
    print("relative output error vs float32: " + ", ".join(f"{k} {v:.3f}" for k, v in errors.items()))
    for name, result in measured.items():
        print(f"{name}: {result.images_per_s:.1f} images/s")
    fx_speed = measured["FX x86 INT8"].images_per_s
    print(f"PT2E / FX: {measured['PT2E + inductor INT8'].images_per_s / fx_speed:.2f}x")
    print(f"cpu: {cpu_features()}")


if __name__ == "__main__":
    main()
