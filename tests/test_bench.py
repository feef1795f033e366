"""The benchmark suite (``repvgg bench``) on tiny protocols: what it measures and what it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from repvgg.cli import main
from repvgg.exceptions import ModelConfigError
from repvgg.studies.bench import (
    TORCHVISION_BASELINES,
    Protocol,
    build,
    candidates,
    conv_density,
    default_protocol,
    markdown_report,
    memory_of_residual_vs_plain,
    run_bench,
    write_reports,
)

TINY = Protocol("cpu", batch_size=1, image_size=32, warmup=0, batches=1, rounds=2)


def test_candidates_cover_both_forms_the_baselines_and_timm() -> None:
    chosen = candidates(["a0", "RepVGG-B1g2"], baselines=["resnet18", "vgg16"])
    specs = [c.spec for c in chosen]
    assert specs[:4] == ["repvgg_a0:train", "repvgg_a0:deploy", "repvgg_b1g2:train", "repvgg_b1g2:deploy"]
    assert specs[4:6] == ["torchvision:resnet18", "torchvision:vgg16"]
    assert specs[6:] == ["timm:repvgg_a0", "timm:repvgg_b1g2"]
    deploy_a0 = chosen[1]
    assert (deploy_a0.paper_top1, deploy_a0.paper_speed) == (72.41, 3256)
    assert len(candidates()) == 14 * 2 + 9 + 14
    with pytest.raises(ModelConfigError, match="Unknown baseline 'resnet9'"):
        candidates(["a0"], baselines=["resnet9"])


def test_baselines_are_measured_with_batchnorm_folded_like_the_papers() -> None:
    resnet = build("torchvision:resnet18")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())
    deployed = build("repvgg_a0:deploy")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())


def test_run_bench_reports_every_measure_and_ratios(tmp_path: Path) -> None:
    chosen = candidates(["a0"], baselines=["resnet18"], timm_peers=False)
    result = run_bench(chosen, TINY, baseline="resnet18", measure_memory=False, progress=False)
    rows = {row.spec: row for row in result.rows}
    assert set(rows) == {"repvgg_a0:train", "repvgg_a0:deploy", "torchvision:resnet18"}
    assert rows["repvgg_a0:deploy"].params == 8_309_384 and rows["repvgg_a0:train"].params == 9_108_968
    assert rows["repvgg_a0:deploy"].gmacs == pytest.approx(1.361e9 * (32 / 224) ** 2 / 1e9, rel=0.05)
    assert all(row.examples_per_s > 0 and row.latency_ms > 0 and row.spread >= 0 for row in rows.values())
    assert rows["torchvision:resnet18"].speed_ratio == 1.0 and result.baseline == "resnet18 (BN fused)"
    text = markdown_report(result)
    assert "Protocol: cpu, batch 1, float32, 32x32, 0 warm-up then 2 timed batches" in text
    assert "| repvgg_a0 (deploy) | 8.31 |" in text and "| 72.41 | 3256 |" in text
    written = write_reports(result, tmp_path, figures=True)
    assert [p.name for p in written] == ["bench.json", "bench.md", "figure1.png"]
    assert json.loads(written[0].read_text())["rows"][0]["spec"] == "repvgg_a0:train"
    assert written[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ModelConfigError, match="baseline 'vgg16' is not among"):
        run_bench(chosen[:1], TINY, baseline="vgg16", measure_memory=False, progress=False)


@pytest.mark.slow
def test_every_torchvision_baseline_is_built_counted_and_timed() -> None:
    chosen = candidates([], baselines=list(TORCHVISION_BASELINES), timm_peers=False)
    protocol = Protocol("cpu", batch_size=1, image_size=64, warmup=0, batches=1, rounds=1)
    rows = {
        row.spec.split(":")[1]: row
        for row in run_bench(chosen, protocol, progress=False, measure_memory=False).rows
    }
    assert set(rows) == set(TORCHVISION_BASELINES)
    assert all(row.examples_per_s > 0 for row in rows.values())
    assert rows["resnet152"].gmacs > rows["resnet101"].gmacs > rows["resnet50"].gmacs > rows["resnet18"].gmacs
    assert rows["regnet_x_3_2gf"].gmacs > rows["efficientnet_b0"].gmacs > 0


@pytest.mark.slow
def test_a_residual_network_holds_more_memory_than_a_plain_one() -> None:
    protocol = Protocol("cpu", batch_size=2, image_size=128, warmup=0, batches=1, rounds=1)
    memory = memory_of_residual_vs_plain(protocol, width=32, depth=4)
    peaks = memory["peak_memory_mib"]
    # One activation is 2 x 32 x 128 x 128 floats = 4 MiB: the residual block keeps its input alive.
    assert peaks["plain"] is not None and peaks["residual"] is not None
    assert peaks["residual"] >= peaks["plain"] + 3
    assert (memory["batch"], memory["image_size"], memory["device"]) == (2, 128, "cpu"), "said on figure3.png"


def test_figure3_is_drawn_with_its_values_and_its_protocol(tmp_path: Path) -> None:
    from repvgg.studies.bench import figure3

    memory = {"width": 32, "depth": 4, "batch": 2, "image_size": 128, "device": "cpu"}
    memory["peak_memory_mib"] = {"residual": 12.5, "plain": 8.25}
    path = figure3(memory, tmp_path / "figure3.png")
    assert path.stat().st_size > 1000


def test_conv_density_counts_every_kernel_size() -> None:
    rows = conv_density(TINY, kernel_sizes=(1, 3))
    assert [row["kernel"] for row in rows] == [1, 3]
    assert all(row["tflops"] > 0 for row in rows) and rows[0]["shape"].startswith("batch 1, 256->256")


def test_default_protocols_follow_the_paper_on_cuda() -> None:
    paper = default_protocol("cuda")
    assert (paper.batch_size, paper.image_size, paper.warmup, paper.timed_batches) == (128, 224, 50, 50)
    assert default_protocol("cpu", quick=True).batch_size < default_protocol("cpu").batch_size


def test_bench_command_writes_its_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["bench", "--models", "a0", "--forms", "deploy", "--baselines", "resnet18", "--no-timm"]
    arguments += [
        "--batch-size",
        "1",
        "--image-size",
        "32",
        "--warmup",
        "0",
        "--batches",
        "1",
        "--rounds",
        "1",
    ]
    arguments += ["--no-memory", "--no-extras", "--device", "cpu", "--output", str(tmp_path)]
    assert main(arguments) == 0
    out = capsys.readouterr().out
    assert "Measuring 2 networks: cpu, batch 1" in out and "repvgg_a0 (deploy)" in out and "│" in out
    assert (tmp_path / "bench.md").is_file() and (tmp_path / "bench.json").is_file()


def test_every_cpu_record_names_the_capability_and_the_flags_that_matter() -> None:
    from repvgg.io.machine import ISA_FLAGS, cpu_features
    from repvgg.runtime.device import device_name

    cpu = cpu_features()
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(cpu["flags"]) <= set(ISA_FLAGS)
    assert cpu["fast_bf16"] == bool({"avx512_bf16", "amx_bf16"} & set(cpu["flags"]))
    assert cpu["fast_int8"] == bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu["flags"]))
    name = device_name(torch.device("cpu"))
    assert name.startswith(f"{cpu['model']}, {torch.get_num_threads()} threads, {cpu['capability']}")
    assert all(flag in name for flag in cpu["flags"] if flag in ("avx512_bf16", "avx512_vnni", "amx_int8"))
