"""`mask2former bench`: the per-stage report (table and JSON) on a tiny preset, and its one-line errors."""

from __future__ import annotations

import json

import pytest

from mask2former.cli import main
from mask2former.profiling import STAGES

TINY = [
    "bench",
    "--preset",
    "synth-tiny",
    "--size",
    "64x96",
    "--runs",
    "1",
    "--warmup",
    "0",
    "--threads",
    "1",
    "--dtype",
    "fp32",  # every dtype side by side: test_dtypes_side_by_side
]


@pytest.mark.parametrize("extra", [[], ["--reference", "--batch-size", "2"], ["--no-reuse-memory"]])
def test_json_report_has_every_stage(capsys, extra):
    assert main(TINY + ["--json"] + extra) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == ("reference" if "--reference" in extra else "fast")
    assert report["input"] == [2 if "--batch-size" in extra else 1, 3, 64, 96]
    assert report["reuse_memory"] == ("--no-reuse-memory" not in extra)
    assert list(report["stages"]) == list(STAGES)
    assert report["matmul_peak_gflops"] > 0
    for name in ("backbone", "pixel decoder", "transformer decoder"):
        row = report["stages"][name]
        assert row["min_ms"] > 0 and row["median_ms"] >= row["min_ms"]
        assert row["gflop"] > 0 and row["gflops_per_s"] > 0
        assert row["peak_mb"] >= 0
    stage_flops = sum(row["gflop"] for row in report["stages"].values())
    assert report["total"]["gflop"] == pytest.approx(stage_flops)


def test_reference_path_counts_more_flops_than_the_fast_path(capsys):
    # Full-resolution intermediate masks cost matmul FLOPs that the inference path does not spend.
    main(TINY + ["--json"])
    fast = json.loads(capsys.readouterr().out)
    main(TINY + ["--json", "--reference"])
    reference = json.loads(capsys.readouterr().out)
    decoder = "transformer decoder"
    assert reference["stages"][decoder]["gflop"] > fast["stages"][decoder]["gflop"]
    # The other stages do the same matmul work either way.
    for name in ("backbone", "pixel decoder"):
        assert reference["stages"][name]["gflop"] == pytest.approx(fast["stages"][name]["gflop"], rel=1e-3)


def test_table(capsys):
    assert main(TINY) == 0
    out = capsys.readouterr().out
    assert "fast path" in out and "matmul peak" in out
    for name in STAGES + ("total",):
        assert any(line.startswith(name) for line in out.splitlines()), name


@pytest.mark.parametrize(
    "args,message",
    [
        (["--size", "100x96"], "multiples of 32"),
        (["--size", "64"], "expected HxW"),
        (["--runs", "0"], "--runs 0"),
        (["--preset", "nope"], "unknown preset"),
    ],
)
def test_one_line_errors(capsys, args, message):
    assert main(TINY + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_dtypes_side_by_side(capsys):
    import torch

    from mask2former.inference.precision import cpu_supports

    assert (
        main(TINY + ["--json", "--dtype", "fp32,bf16"] if cpu_supports(torch.bfloat16) else TINY + ["--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    names = list(report["dtypes"])
    assert names[0] == "fp32" and report["stages"] == report["dtypes"]["fp32"]["stages"]
    for figures in report["dtypes"].values():
        assert figures["matmul_peak_gflops"] > 0
        assert list(figures["stages"]) == list(STAGES)
        row = figures["total"]
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
    assert main(TINY + ["--dtype", "int4"]) == 2
    assert "--dtype int4" in capsys.readouterr().err
