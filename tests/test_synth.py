"""Synthetic scenes: determinism, consistency of panoptic.json with the PNGs, the CLI."""

import json

import numpy as np
import pytest
from PIL import Image

from mask2former.cli import main
from mask2former.data.catalog import get_meta
from mask2former.data.synth import SYNTH_META, generate, make_scene
from mask2former.fileio import read_panoptic_png


def _bytes_of(folder):
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    generate(out, 6, seed=3, size=(64, 80))
    return out


def test_same_seed_same_bytes_different_seed_different(tmp_path, synth_set):
    generate(tmp_path / "again", 6, seed=3, size=(64, 80))
    generate(tmp_path / "other", 6, seed=4, size=(64, 80))
    first, again, other = _bytes_of(synth_set), _bytes_of(tmp_path / "again"), _bytes_of(tmp_path / "other")
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[k] != other[k] for k in first if k.startswith("images/"))


def test_scene_i_does_not_depend_on_n(tmp_path, synth_set):
    generate(tmp_path / "short", 2, seed=3, size=(64, 80))
    short = (tmp_path / "short/images/000001.png").read_bytes()
    assert short == (synth_set / "images/000001.png").read_bytes()


def test_panoptic_json_matches_pngs(synth_set):
    data = json.loads((synth_set / "panoptic.json").read_text())
    categories = {c["id"]: c for c in data["categories"]}
    assert [c["id"] for c in data["categories"]] == SYNTH_META.category_ids
    assert len(data["images"]) == len(data["annotations"]) == 6
    for info, annotation in zip(data["images"], data["annotations"], strict=True):
        assert annotation["image_id"] == info["id"]
        image = np.asarray(Image.open(synth_set / "images" / info["file_name"]))
        id_map = read_panoptic_png(synth_set / "panoptic" / annotation["file_name"])
        semantic = np.asarray(Image.open(synth_set / "semantic" / annotation["file_name"]))
        assert image.shape == (64, 80, 3) and id_map.shape == semantic.shape == (64, 80)
        segments = {s["id"]: s for s in annotation["segments_info"]}
        assert set(np.unique(id_map)) == set(segments)  # every pixel labelled, no missing segment
        for segment_id, segment in segments.items():
            ys, xs = np.nonzero(id_map == segment_id)
            assert segment["area"] == ys.size
            assert segment["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert segment["iscrowd"] == 0
            index = SYNTH_META.category_ids.index(segment["category_id"])
            assert np.all(semantic[ys, xs] == index)  # the semantic PNG holds contiguous indices
        stuff = [s for s in segments.values() if not categories[s["category_id"]]["isthing"]]
        assert 1 <= len(stuff) <= 3


def test_scenes_have_things_and_all_classes_occur():
    seen = set()
    for i in range(40):
        scene = make_scene(np.random.default_rng([7, i]), 64, 64)
        seen.update(s["category_id"] for s in scene.segments_info)
        things = [s for s in scene.segments_info if s["category_id"] <= 5]
        # occlusion never leaves a tiny fragment
        assert all(s["area"] >= 40 for s in things)
    assert seen == set(SYNTH_META.category_ids)


def test_catalog_knows_synth():
    meta = get_meta("synth")
    assert meta.class_names == SYNTH_META.class_names
    assert sum(meta.thing_classes) == 5 and meta.num_classes == 9


def test_cli_writes_and_refuses_nonempty(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", str(out), "--n", "2", "--seed", "1", "--size", "32x48"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert np.asarray(Image.open(out / "images/000000.png")).shape == (32, 48, 3)
    assert main(["synth", str(out), "--n", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["synth", str(out), "--n", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png"]
    assert main(["synth", str(out), "--size", "axb"]) == 2


def test_class_subset_with_new_shapes(tmp_path, capsys):
    out = tmp_path / "subset"
    classes = "circle,hexagon,cross,sky,water"
    assert main(["synth", str(out), "--n", "12", "--seed", "4", "--size", "64x64", "--classes", classes]) == 0
    document = json.loads((out / "panoptic.json").read_text())
    names = [c["name"] for c in document["categories"]]
    assert names == ["circle", "hexagon", "cross", "sky", "water"]
    used = {s["category_id"] for a in document["annotations"] for s in a["segments_info"]}
    assert used == {c["id"] for c in document["categories"]}  # every chosen class drawn, nothing else
    semantic = np.stack([np.asarray(Image.open(p)) for p in sorted((out / "semantic").iterdir())])
    assert semantic.max() == len(names) - 1
    assert main(["synth", str(tmp_path / "bad"), "--classes", "circle,dragon,sky"]) == 2
    assert "dragon" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "bad2"), "--classes", "circle,square"]) == 2
