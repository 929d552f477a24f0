"""Outputs of `predict` are never lost or mixed: journal, lock, refusal, resume, SIGKILL/SIGINT, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mask2former.cli import main
from mask2former.data.synth import generate
from mask2former.outputs.journal import JOURNAL, LOCK, OutputLock

TIMEOUT = 300


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Many small scenes: a folder run that takes a few seconds, so it can be stopped in the middle."""
    folder = tmp_path_factory.mktemp("scenes")
    generate(folder, 24, seed=7, size=(48, 48))
    return folder


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    src = str(Path(__file__).parents[1] / "src")
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, env.get("PYTHONPATH", "")])}


def _predict(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [sys.executable, *launcher, "-m", "mask2former", "predict", *args]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _records(out: Path) -> list[Path]:
    folder = out / JOURNAL / "images"
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def _start_and_stop(scenes: Path, out: Path, sig: int) -> tuple[int, str]:
    """Start predict over the scenes, one image per batch, and send `sig` once two images are finished."""
    command = [sys.executable, "-m", "mask2former", "predict", str(scenes), "--out", str(out)]
    process = subprocess.Popen(
        [*command, "--batch-size", "1", "--no-picture"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT
    while len(_records(out)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=TIMEOUT)
    return process.returncode, stderr


@pytest.fixture(scope="module")
def reference(scenes, tmp_path_factory) -> Path:
    """One uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = _predict(str(scenes), "--out", str(out), "--batch-size", "1", "--no-picture")
    assert result.returncode == 0, result.stderr
    return out


def _same_outputs(out: Path, reference: Path) -> None:
    assert (out / "panoptic.json").read_bytes() == (reference / "panoptic.json").read_bytes()
    pngs = sorted(p.name for p in (reference / "panoptic").iterdir())
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == pngs and len(pngs) == 24
    for name in pngs:
        assert (out / "panoptic" / name).read_bytes() == (reference / "panoptic" / name).read_bytes(), name


@pytest.mark.slow
def test_sigkill_keeps_finished_images_and_resume_completes_the_run(scenes, reference, tmp_path):
    out = tmp_path / "out"
    code, _ = _start_and_stop(scenes, out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    finished = [json.loads(p.read_text()) for p in _records(out)]
    assert 2 <= len(finished) < 24  # stopped in the middle, the finished images' segment lists kept
    for record in finished:
        assert (out / record["files"][0]).is_file() and record["segments_info"]
    (out / ".panoptic.json.4242.deadbeef.tmp").write_text("{")  # what a killed atomic write leaves
    (out / "panoptic" / ".000003.png.4242.deadbeef.tmp").write_bytes(b"")

    refused = _predict(str(scenes), "--out", str(out), "--no-picture")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "holds the results of an earlier run" in refused.stderr and "--resume" in refused.stderr

    resumed = _predict(str(scenes), "--out", str(out), "--resume", "--no-picture")  # the stale lock is taken
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping {len(finished)} images finished by the earlier run" in resumed.stdout
    assert resumed.stdout.count("->") == 24 - len(finished)  # only the rest was predicted
    _same_outputs(out, reference)
    assert not list(out.rglob("*.tmp")) and not (out / LOCK).exists()


@pytest.mark.slow
def test_ctrl_c_writes_the_finished_images_consistently(scenes, tmp_path):
    out = tmp_path / "out"
    code, stderr = _start_and_stop(scenes, out, signal.SIGINT)
    assert code == 130, stderr
    assert "rerun with --resume" in stderr.strip().splitlines()[-1] and "Traceback" not in stderr
    document = json.loads((out / "panoptic.json").read_text())
    finished = [json.loads(p.read_text()) for p in _records(out)]
    assert 2 <= len(document["annotations"]) == len(finished) < 24
    for annotation in document["annotations"]:
        assert (out / "panoptic" / annotation["file_name"]).is_file()
    assert not (out / LOCK).exists()


def test_a_second_run_is_refused_overwrite_replaces_resume_must_match(scenes, tmp_path, capsys):
    out = tmp_path / "out"
    image = str(scenes / "images" / "000000.png")
    assert main(["predict", image, "--out", str(out)]) == 0
    assert main(["predict", image, "--out", str(out), "--task", "instance"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out}: holds the results of an earlier run" in err[0]
    assert (out / "panoptic.json").is_file()  # untouched

    assert main(["predict", image, "--out", str(out), "--task", "instance", "--resume"]) == 2
    assert "the run to resume had task 'panoptic', this one 'instance'" in capsys.readouterr().err

    assert main(["predict", image, "--out", str(out), "--task", "instance", "--overwrite"]) == 0
    assert not (out / "panoptic.json").exists() and not (out / "panoptic").exists()
    assert not (out / "000000.panoptic.png").exists() and (out / "000000.instance.png").is_file()
    assert (out / "instances.json").is_file() and (out / "coco_dataset.json").is_file()

    capsys.readouterr()
    assert main(["predict", image, "--out", str(out), "--task", "instance", "--resume"]) == 0
    assert "skipping 1 images finished by the earlier run" in capsys.readouterr().out


def test_concurrent_runs_are_refused_and_a_dead_runs_lock_is_taken_over(scenes, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    image = str(scenes / "images" / "000001.png")
    lock = OutputLock(out)
    lock.acquire()  # another live run holds the folder
    try:
        assert main(["predict", image, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"another predict (pid {os.getpid()} on" in err[0]
        assert not (out / "panoptic").exists()
    finally:
        lock.release()
    (out / LOCK).write_text("pid 999999 on elsewhere\n")  # left by a killed run: nobody holds it
    assert main(["predict", image, "--out", str(out)]) == 0
    assert (out / "panoptic.json").is_file() and not (out / LOCK).exists()


@pytest.mark.slow
def test_torchrun_shards_the_images_with_outputs_identical_to_one_process(scenes, reference, tmp_path):
    out = tmp_path / "out"
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    common = ["--out", str(out), "--batch-size", "1", "--no-picture"]
    result = _predict(str(scenes), *common, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("segmented 24 of 24 images") == 1  # rank 0 reports
    assert result.stdout.count("->") == 24  # each image predicted once, by one of the ranks
    _same_outputs(out, reference)

    again = _predict(str(scenes), *common, "--resume", launcher=launcher)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipping 24 images finished by the earlier run" in again.stdout and "->" not in again.stdout
    _same_outputs(out, reference)


def test_the_folder_files_are_merged_every_few_images(scenes, tmp_path, monkeypatch):
    import mask2former
    from mask2former.outputs.folder import predict_folder
    from mask2former.outputs.inputs import plan_inputs
    from mask2former.writers import PredictionWriter

    images, _ = plan_inputs([str(p) for p in sorted((scenes / "images").iterdir())[:5]])
    predictor = mask2former.load()
    writer = PredictionWriter(tmp_path / "out", predictor.config, "panoptic", pictures=False)
    merged: list[int] = []
    original = PredictionWriter.merge

    def counting(self, records):
        records = list(records)
        merged.append(len(records))
        return original(self, records)

    monkeypatch.setattr(PredictionWriter, "merge", counting)
    summary = predict_folder(predictor, images, writer, {"task": "panoptic"}, merge_every=2, progress=False)
    assert summary.done == 5 and not summary.failed
    assert merged[-1] == 5 and merged[0] == 2 and len(merged) >= 2  # after 2 images, then at the end
    document = json.loads((tmp_path / "out" / "panoptic.json").read_text())
    assert [image["id"] for image in document["images"]] == [1, 2, 3, 4, 5]  # 1..N without ground truth
