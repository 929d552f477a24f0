"""Every evaluation engine against the reference: mask AP by hotcoco and by the pycocotools fallback against
pycocotools' COCOeval itself; PQ from files (imagecodecs or PIL reader, any number of threads) against the
panopticapi rules (test_eval_panoptic.reference_stats); scoring overlapped with inference."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_panoptic import CATEGORIES, random_scene, reference_stats

from mask2former import fileio, rle
from mask2former.evaluation import EvaluationError, coco_engine
from mask2former.evaluation.files import evaluate_panoptic_files, read_panoptic_ids
from mask2former.evaluation.instance import coco_mask_ap
from mask2former.evaluation.model import evaluate_predictor
from mask2former.evaluation.parallel import BackgroundScorer, ordered_map

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

H, W = 48, 64


# ------------------------------------------------------------------ mask AP


def _ellipse(rng) -> np.ndarray:
    rows, cols = np.ogrid[:H, :W]
    cy, cx, ry, rx = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(2, H / 2), rng.uniform(2, W / 2)
    return ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1


def instance_case(seed: int = 0) -> tuple[dict, list[dict]]:
    """Eight images, four categories: crowds (uncompressed RLE), polygons, ground truth without "area",
    an image with detections only, one with ground truth only, one with neither, unmatched detections."""
    rng = np.random.default_rng(seed)
    gt = {
        "images": [{"id": i, "height": H, "width": W} for i in range(1, 9)],
        "annotations": [],
        "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 5, 9)],
    }
    results = []
    for image_id in range(1, 9):
        masks = [_ellipse(rng) for _ in range(0 if image_id in (6, 7) else int(rng.integers(1, 7)))]
        categories = [int(rng.choice([1, 2, 5, 9])) for _ in masks]
        for k, (mask, category) in enumerate(zip(masks, categories, strict=True)):
            annotation = {"image_id": image_id, "category_id": category, "iscrowd": int(k == 3)}
            encoded = rle.encode(mask)[0]
            if k == 3:  # crowd regions are uncompressed RLE in COCO
                encoded = {
                    "size": encoded["size"],
                    "counts": rle._string_to_counts(encoded["counts"]).tolist(),
                }
            elif k == 1:  # a polygon: the mask's bounding box
                x, y, w, h = rle.to_bbox([encoded])[0]
                encoded = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            annotation["segmentation"] = encoded
            if k != 2:
                annotation["area"] = float(rle.area(rle.encode(mask)[0])[0])
            gt["annotations"].append(annotation)
        if image_id in (5, 7):  # ground truth without any detection; an empty image
            continue
        for _ in range(int(rng.integers(2, 12))):
            if masks and rng.random() < 0.7:
                k = int(rng.integers(len(masks)))
                mask = np.roll(masks[k], tuple(rng.integers(-3, 4, size=2)), axis=(0, 1))
                category = categories[k] if rng.random() < 0.8 else int(rng.choice([1, 2, 5, 9]))
            else:
                mask, category = _ellipse(rng), int(rng.choice([1, 2, 5, 9]))
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": rle.encode(mask)[0],
                    "score": float(rng.integers(1, 40)) / 40,  # ties, as real scores have
                }
            )
    return gt, results


def pycocotools_directly(gt: dict, results: list[dict]) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        for i, annotation in enumerate(coco_gt.dataset["annotations"], start=1):
            annotation["id"] = i
        coco_gt.createIndex()
        for annotation in coco_gt.dataset["annotations"]:
            annotation.setdefault(
                "area", float(coco_engine.mask_api("pycocotools").area(coco_gt.annToRLE(annotation)))
            )
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.mark.parametrize("engine", ["hotcoco", "pycocotools"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_ap_engine_gives_pycocotools_statistics(engine, seed):
    gt, results = instance_case(seed)
    reference = pycocotools_directly(gt, results)
    output = coco_engine.run_segm_eval(coco_engine.prepared_ground_truth(gt, engine), results, engine=engine)
    assert output.engine == engine
    np.testing.assert_array_equal(output.stats, reference.stats)  # all 12 figures, every digit
    np.testing.assert_array_equal(output.precision, reference.eval["precision"])
    assert 0 < reference.stats[0] < 1 and (reference.stats[3:6] >= 0).sum() >= 2  # a non-trivial case
    metrics = coco_mask_ap(gt, results, engine=engine)
    assert metrics["AP"] == 100 * float(reference.stats[0]) and metrics["APm"] == 100 * float(
        reference.stats[4]
    )
    assert set(metrics["per_class"]) == {"1", "2", "5", "9"}


def test_auto_uses_hotcoco_and_falls_back_to_pycocotools(monkeypatch):
    gt, results = instance_case(3)
    assert coco_engine.resolve_engine("auto") == "hotcoco"
    with_hotcoco = coco_mask_ap(gt, results)
    monkeypatch.setitem(sys.modules, "hotcoco", None)  # as if not installed
    assert coco_engine.resolve_engine("auto") == "pycocotools"
    assert json.dumps(coco_mask_ap(gt, results)) == json.dumps(with_hotcoco)
    with pytest.raises(ModuleNotFoundError, match="mask AP needs hotcoco"):
        coco_mask_ap(gt, results, engine="hotcoco")
    with pytest.raises(ValueError, match="engine 'fast'"):
        coco_mask_ap(gt, results, engine="fast")


def test_results_checked_in_bulk_equal_results_checked_one_by_one():
    from mask2former.evaluation import InstanceEvaluator

    gt, results = instance_case(2)
    results[0] = {**results[0], "bbox": [0, 0, 1, 1], "score": 1}  # boxes dropped, int scores as float
    original = copy.deepcopy(results)
    evaluator = InstanceEvaluator(gt)
    bulk = evaluator._checked_in_bulk(results)
    assert bulk is not None and bulk == evaluator._checked_one_by_one(results)
    assert "bbox" not in bulk[0] and type(bulk[0]["score"]) is float
    assert results == original
    uncompressed = {**results[1], "segmentation": {"size": [H, W], "counts": [H * W]}}
    assert evaluator._checked_in_bulk([*results, uncompressed]) is None  # the general path takes it
    evaluator.update_coco([*results, uncompressed])
    assert len(evaluator.results) == len(results) + 1
    with pytest.raises(EvaluationError, match="result 3: image_id 99"):
        evaluator.update_coco([*results[:3], {**results[3], "image_id": 99}])


def test_results_already_in_checked_form_are_kept_and_left_untouched_by_either_engine():
    from mask2former.evaluation import InstanceEvaluator

    gt, results = instance_case(1)
    plain = [
        {**r, "score": float(r["score"]), "segmentation": dict(r["segmentation"], size=[H, W])}
        for r in results
    ]
    evaluator = InstanceEvaluator(gt)
    kept = evaluator._checked_in_bulk(plain)
    assert kept == evaluator._checked_one_by_one(plain) and all(
        a is b for a, b in zip(kept, plain, strict=True)
    )
    # float sizes equal the image's but are not its integers: those results are rebuilt
    floats = [
        plain[0] | {"segmentation": {**plain[0]["segmentation"], "size": [float(H), float(W)]}},
        *plain[1:],
    ]
    rebuilt = evaluator._checked_in_bulk(floats)
    assert rebuilt[0] is not floats[0] and rebuilt[0]["segmentation"]["size"] == [H, W]
    assert type(rebuilt[0]["segmentation"]["size"][0]) is int
    original = copy.deepcopy(plain)
    figures = {
        engine: json.dumps(coco_mask_ap(gt, plain, engine=engine)) for engine in ("hotcoco", "pycocotools")
    }
    assert plain == original and figures["hotcoco"] == figures["pycocotools"]


def test_auto_takes_pycocotools_where_hotcoco_refuses_the_input():
    gt, results = instance_case(0)
    name = {image["id"]: f"img{image['id']}" for image in gt["images"]}  # COCO allows any id; hotcoco not
    named_gt = {
        **gt,
        "images": [{**image, "id": name[image["id"]]} for image in gt["images"]],
        "annotations": [{**a, "image_id": name[a["image_id"]]} for a in gt["annotations"]],
    }
    named_results = [{**r, "image_id": name[r["image_id"]]} for r in results]
    with pytest.raises(ValueError):
        coco_mask_ap(named_gt, named_results, engine="hotcoco")
    assert json.dumps(coco_mask_ap(named_gt, named_results)) == json.dumps(coco_mask_ap(gt, results))


def test_polygon_results_without_pycocotools(monkeypatch):
    gt, results = instance_case(4)
    polygon = {**results[0], "segmentation": [[5.0, 5.0, 30.0, 5.0, 30.0, 20.0, 5.0, 20.0]]}
    expected = coco_mask_ap(gt, [polygon, *results[1:]], engine="pycocotools")
    for name in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval", "pycocotools.mask"):
        monkeypatch.setitem(sys.modules, name, None)
    assert json.dumps(coco_mask_ap(gt, [polygon, *results[1:]])) == json.dumps(expected)
    assert gt == instance_case(4)[0]  # the caller's dict is left alone


# ------------------------------------------------------------------ PQ from files


def write_panoptic_case(root: Path, seed: int = 0, areas: bool = False) -> list[tuple]:
    """Random scenes (crowds, VOID, unmatched segments, several categories) plus an all-VOID image without
    segments and one whose prediction is all VOID, written as COCO panoptic files; returns the scenes.
    areas: the ground truth lists each segment's pixel count as "area", as COCO's files do."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(12)]
    empty = np.zeros((24, 32), dtype=np.int32)
    scenes.append((empty, [], empty.copy(), []))
    pred_map, pred_segments, gt_map, gt_segments = random_scene(rng)
    scenes.append((empty.copy(), [], gt_map, gt_segments))
    for folder in ("gt", "pred"):
        (root / folder).mkdir()
    listed = {"gt": [], "pred": []}
    for i, (pred_map, pred_segments, gt_map, gt_segments) in enumerate(scenes):
        fileio.write_panoptic_png(root / "gt" / f"{i}.png", gt_map)
        fileio.write_panoptic_png(root / "pred" / f"{i}.png", pred_map)
        if areas:
            gt_segments = [{**s, "area": int((gt_map == s["id"]).sum())} for s in gt_segments]
        listed["gt"].append({"image_id": i, "file_name": f"{i}.png", "segments_info": gt_segments})
        listed["pred"].append({"image_id": i, "file_name": f"{i}.png", "segments_info": pred_segments})
    for name in ("gt", "pred"):
        with open(root / f"{name}.json", "w") as file:
            json.dump({"annotations": listed[name], "categories": CATEGORIES}, file)
    return scenes


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def score_files(root: Path, workers: int | None, engine: str = "reference") -> dict:
    return evaluate_panoptic_files(
        root / "pred.json", root / "pred", root / "gt.json", root / "gt", workers=workers, engine=engine
    )


def assert_panopticapi_statistics(metrics: dict, scenes: list[tuple]) -> None:
    """TP/FP/FN of every category equal to the panopticapi rules (test_eval_panoptic.reference_stats);
    PQ/SQ/RQ per category and per group to 1e-9 (engines add the IoUs in different orders)."""
    reference = reference_stats(scenes, CATEGORIES)
    evaluated = {}
    for category in CATEGORIES:
        tp, fp, fn, iou = reference[category["id"]]
        row = metrics["per_class"][str(category["id"])]
        assert (row["TP"], row["FP"], row["FN"]) == (tp, fp, fn), category
        if tp + fp + fn:
            evaluated[category["id"]] = (
                100 * iou / (tp + 0.5 * fp + 0.5 * fn),
                100 * iou / tp if tp else 0.0,
                100 * tp / (tp + 0.5 * fp + 0.5 * fn),
            )
        for key, value in zip(("PQ", "SQ", "RQ"), evaluated.get(category["id"], (0.0,) * 3), strict=True):
            assert row[key] == pytest.approx(value, rel=0, abs=1e-9), (category, key)
    for suffix, isthing in (("", None), ("_th", 1), ("_st", 0)):
        group = [
            v for c, v in evaluated.items() if isthing is None or CATEGORIES_BY_ID[c]["isthing"] == isthing
        ]
        assert metrics["n" + suffix] == len(group)
        for k, key in enumerate(("PQ", "SQ", "RQ")):
            expected = sum(v[k] for v in group) / len(group) if group else float("nan")
            assert metrics[key + suffix] == pytest.approx(expected, rel=0, abs=1e-9, nan_ok=True), (
                key + suffix
            )
    assert metrics["images"] == len(scenes)


CATEGORIES_BY_ID = {c["id"]: c for c in CATEGORIES}


def assert_same_metrics(ours: dict, theirs: dict) -> None:
    """The same dict: keys, counts and names equal, floats to 1e-9, NaN in the same places."""
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        if isinstance(value, dict):
            assert_same_metrics(value, theirs[key])
        elif isinstance(value, float):
            assert value == pytest.approx(theirs[key], rel=0, abs=1e-9, nan_ok=True), key
        else:
            assert value == theirs[key], key


@pytest.mark.parametrize("engine", ["hotcoco", "reference"])
@pytest.mark.parametrize("seed, areas", [(0, False), (1, False), (2, True)])
def test_each_pq_engine_gives_the_panopticapi_statistics(tmp_path, engine, seed, areas):
    scenes = write_panoptic_case(tmp_path, seed, areas)
    metrics = score_files(tmp_path, 2, engine)
    assert_panopticapi_statistics(metrics, scenes)
    reference = reference_stats(scenes, CATEGORIES)
    assert all(sum(s[k] for s in reference.values()) for k in range(3))  # tp, fp and fn all occur
    assert any(s.get("iscrowd") for scene in scenes for s in scene[3])  # crowd regions too
    other = score_files(tmp_path, 1, "reference" if engine == "hotcoco" else "hotcoco")
    assert_same_metrics(metrics, other)  # one compute(): the same dict from both engines


def test_reference_engine_refuses_a_ground_truth_area_that_is_not_its_pixel_count(tmp_path):
    # panopticapi (and hotcoco) score ground truth with the JSON's area; our engine counts the map's pixels,
    # so it refuses files where the two disagree instead of giving other figures.
    write_panoptic_case(tmp_path, seed=2, areas=True)
    before = score_files(tmp_path, 2, "reference")
    edit_json(tmp_path / "gt.json", lambda o: o["annotations"][1]["segments_info"][0].update(area=1))
    with pytest.raises(EvaluationError, match=r"area 1 in segments_info but covers \d+ pixels"):
        score_files(tmp_path, 2, "reference")
    assert score_files(tmp_path, 2, "hotcoco")["PQ"] != before["PQ"]  # the JSON's area counts there


def test_pq_engines_agree_where_a_group_has_no_category(tmp_path):
    def things_only(segments):
        return [{**s, "category_id": 1 if s["category_id"] == 7 else s["category_id"]} for s in segments]

    def relabel(obj):
        for annotation in obj["annotations"]:
            annotation["segments_info"] = things_only(annotation["segments_info"])

    scenes = write_panoptic_case(tmp_path, seed=5)
    for name in ("gt.json", "pred.json"):
        edit_json(tmp_path / name, relabel)
    scenes = [(p, things_only(ps), g, things_only(gs)) for p, ps, g, gs in scenes]
    hotcoco, reference = score_files(tmp_path, 2, "hotcoco"), score_files(tmp_path, 2, "reference")
    assert hotcoco["n_st"] == 0 and np.isnan(hotcoco["PQ_st"]) and hotcoco["per_class"]["7"]["PQ"] == 0.0
    assert_panopticapi_statistics(hotcoco, scenes)
    assert_same_metrics(hotcoco, reference)


def _without_image_ids(root: Path) -> None:  # predictions paired by PNG name
    edit_json(root / "pred.json", lambda o: [a.pop("image_id") for a in o["annotations"]])


def _named_image_ids(root: Path) -> None:  # COCO allows string ids; hotcoco's reader does not
    for name in ("gt.json", "pred.json"):
        edit_json(root / name, lambda o: [a.update(image_id=f"img{a['image_id']}") for a in o["annotations"]])


def _licenses_hotcoco_cannot_parse(root: Path) -> None:  # a field we never read
    edit_json(root / "pred.json", lambda o: o.update(licenses=[1]))


@pytest.mark.parametrize("change", [_without_image_ids, _named_image_ids, _licenses_hotcoco_cannot_parse])
def test_hotcoco_gets_the_files_by_path_or_the_images_we_paired(tmp_path, monkeypatch, change):
    import hotcoco.panoptic

    write_panoptic_case(tmp_path, seed=3)
    given = []
    real = hotcoco.panoptic.PanopticEval

    def spy(gt, pred, **folders):
        given.append((type(gt).__name__, type(pred).__name__))
        return real(gt, pred, **folders)

    monkeypatch.setattr(hotcoco.panoptic, "PanopticEval", spy)
    expected = json.dumps(score_files(tmp_path, None, "hotcoco"))
    assert given == [("str", "str")]  # integer ids, paired by image_id: hotcoco reads the files itself
    change(tmp_path)
    given.clear()
    assert json.dumps(score_files(tmp_path, None, "hotcoco")) == expected
    assert given[-1] == ("dict", "dict")  # our pairs, image ids replaced by positions


IMAGE_3 = "{r}/pred/3.png (image_id 3, segments_info in pred.json; ground truth {r}/gt/3.png): "
HOTCOCO_ERRORS = {
    "PNG id not in JSON": (
        lambda r: edit_json(r / "pred.json", lambda o: o["annotations"][3]["segments_info"].pop(0)),
        IMAGE_3 + "predicted segment",
        "is in the PNG but not in segments_info",
    ),
    "JSON id not in PNG": (
        lambda r: edit_json(
            r / "pred.json",
            lambda o: o["annotations"][3]["segments_info"].append({"id": 77777, "category_id": 1}),
        ),
        IMAGE_3 + "predicted segment",
        "77777 is in segments_info but not in",
    ),
    "shape mismatch": (
        lambda r: fileio.write_panoptic_png(r / "pred" / "3.png", np.zeros((5, 32), dtype=np.int32)),
        IMAGE_3,
        "the prediction is 5",
    ),
    "missing PNG": (
        lambda r: (r / "pred" / "3.png").unlink(),
        "{r}/pred/3.png (image_id 3): ",
        "cannot open",
    ),
    "truncated PNG": (
        lambda r: (r / "pred" / "3.png").write_bytes((r / "pred" / "3.png").read_bytes()[:60]),
        "{r}/pred/3.png (image_id 3): ",
        "cannot decode",
    ),
    "missing ground-truth PNG": (
        lambda r: (r / "gt" / "5.png").unlink(),
        "{r}/gt/5.png (image_id 5): ",
        "open",
    ),
    "ground truth hotcoco cannot parse": (
        lambda r: edit_json(
            r / "gt.json", lambda o: o["annotations"][2]["segments_info"][0].update(area=3.5)
        ),
        "{r}/gt.json: hotcoco cannot read it",
        "3.5",
    ),
}


@pytest.mark.parametrize("case", list(HOTCOCO_ERRORS))
def test_hotcoco_errors_are_one_line_naming_the_files(tmp_path, case):
    write_panoptic_case(tmp_path, seed=6)
    breaking, prefix, detail = HOTCOCO_ERRORS[case]
    breaking(tmp_path)
    with pytest.raises(EvaluationError) as caught:
        score_files(tmp_path, 2, "hotcoco")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(prefix.format(r=tmp_path)) and detail in message
    # auto: our engine names the problem in its own words (a fractional area: not the pixels it covers)
    with pytest.raises(EvaluationError) as ours:
        score_files(tmp_path, 2, "auto")
    assert str(ours.value) != message and str(tmp_path) in str(ours.value)


def test_pq_auto_takes_hotcoco_else_the_reference_engine(tmp_path, monkeypatch):
    from mask2former.evaluation import panoptic_engine

    write_panoptic_case(tmp_path, seed=4)
    calls = []
    real = panoptic_engine.hotcoco_totals
    monkeypatch.setattr(panoptic_engine, "hotcoco_totals", lambda *args: calls.append(1) or real(*args))
    assert json.dumps(score_files(tmp_path, 2, "auto")) == json.dumps(score_files(tmp_path, 2, "hotcoco"))
    assert len(calls) == 2
    monkeypatch.setitem(sys.modules, "hotcoco", None)  # as if not installed
    assert panoptic_engine.resolve_engine("auto") == "reference"
    assert json.dumps(score_files(tmp_path, 2, "auto")) == json.dumps(score_files(tmp_path, 2, "reference"))
    assert len(calls) == 2
    with pytest.raises(ModuleNotFoundError, match=r"PQ through hotcoco needs hotcoco: pip install"):
        score_files(tmp_path, 2, "hotcoco")
    with pytest.raises(ValueError, match="engine 'fast'"):
        score_files(tmp_path, 2, "fast")


def test_pq_from_files_with_any_reader_and_thread_count_gives_the_panopticapi_statistics(
    tmp_path, monkeypatch
):
    scenes = write_panoptic_case(tmp_path)
    runs = {f"imagecodecs, {n} threads": score_files(tmp_path, n) for n in (1, 3)}
    monkeypatch.setattr(fileio, "decode_rgb8_png", lambda path, out=None: None)  # the PIL reader
    runs["PIL, 2 threads"] = score_files(tmp_path, 2)
    for metrics in runs.values():
        assert_panopticapi_statistics(metrics, scenes)
    first = json.dumps(runs.pop("imagecodecs, 1 threads"))
    assert all(json.dumps(metrics) == first for metrics in runs.values())  # bit for bit


def test_errors_surface_in_image_order_with_threads(tmp_path):
    write_panoptic_case(tmp_path)
    (tmp_path / "pred" / "9.png").write_bytes(b"not a png")
    (tmp_path / "gt" / "4.png").unlink()
    with pytest.raises(EvaluationError, match=r"gt/4.png: no such file"):
        score_files(tmp_path, 4)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_fast_reader_leaves_other_png_kinds_to_pil(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(fileio.decode_rgb8_png(tmp_path / "rgb.png"), rgb)
    np.testing.assert_array_equal(
        read_panoptic_ids(tmp_path / "rgb.png"), fileio.rgb2id(rgb.astype(np.int64))
    )
    image = (
        Image.fromarray(rgb).convert(mode)
        if mode != "I;16"
        else Image.fromarray(rgb[..., 0].astype(np.uint16))
    )
    image.save(tmp_path / "other.png")
    assert fileio.decode_rgb8_png(tmp_path / "other.png") is None
    with Image.open(tmp_path / "other.png") as pil:
        expected = fileio.rgb2id(np.asarray(pil.convert("RGB")))
    np.testing.assert_array_equal(read_panoptic_ids(tmp_path / "other.png"), expected)


# ------------------------------------------------------------------ threads


def test_ordered_map_keeps_order_and_raises_the_first_error_in_order():
    seen = set()

    def slow_square(x):
        seen.add(threading.current_thread().name)
        if x in (7, 11):
            raise ValueError(f"item {x}")
        return x * x

    assert list(ordered_map(slow_square, range(7), workers=3)) == [x * x for x in range(7)]
    with pytest.raises(ValueError, match="item 7"):
        list(ordered_map(slow_square, range(20), workers=3))
    assert any(name.startswith("evaluation") for name in seen)
    with pytest.raises(ValueError, match="workers 0"):
        list(ordered_map(slow_square, range(3), workers=0))


def test_background_scorer_scores_in_order_and_hands_errors_back():
    scored = []
    scorer = BackgroundScorer(scored.append, depth=2)
    for i in range(50):
        scorer.put(i)
    scorer.finish()
    assert scored == list(range(50))

    def fail_on_three(item):
        if item == 3:
            raise EvaluationError("bad item 3")

    scorer = BackgroundScorer(fail_on_three, depth=1)
    with pytest.raises(EvaluationError, match="bad item 3"):
        for i in range(100):
            scorer.put(i)
        scorer.finish()
    scorer.close()


class _FakePredictor:
    """A 'model' whose panoptic result is the ground truth with one segment shifted: no torch model needed."""

    config = SimpleNamespace(class_names=["person", "car", "sky", "unused"])

    def __init__(self, scenes):
        self.scenes = scenes

    def predict(self, image, task, score_threshold=None):
        from mask2former.results import PanopticResult, PanopticSegment

        pred_map, pred_segments, _, _ = self.scenes[int(image[0, 0, 0])]
        contiguous = {c["id"]: i for i, c in enumerate(CATEGORIES)}
        segments = [
            PanopticSegment(
                s["id"], contiguous[s["category_id"]], False, 1.0, int((pred_map == s["id"]).sum())
            )
            for s in pred_segments
        ]
        return PanopticResult(id_map=pred_map, segments=segments)


class _FakeDataset:
    def __init__(self, scenes):
        self.scenes = scenes
        self.meta = SimpleNamespace(
            class_names=[c["name"] for c in CATEGORIES],
            category_ids=[c["id"] for c in CATEGORIES],
            thing_classes=[bool(c["isthing"]) for c in CATEGORIES],
        )

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, index):
        return {"image": torch.full((3, 2, 2), float(index)), "file_name": f"{index}.png"}

    def ground_truth(self, index):
        _, _, gt_map, gt_segments = self.scenes[index]
        return {"id_map": gt_map, "segments_info": gt_segments}


def test_scoring_overlapped_with_inference_gives_the_same_figures():
    rng = np.random.default_rng(5)
    scenes = [random_scene(rng) for _ in range(10)]
    dataset = _FakeDataset(scenes)
    overlapped = evaluate_predictor(_FakePredictor(scenes), dataset, "panoptic", progress=False)
    in_turn = evaluate_predictor(_FakePredictor(scenes), dataset, "panoptic", progress=False, overlap=False)
    assert json.dumps(overlapped) == json.dumps(in_turn)
    reference = reference_stats(scenes, CATEGORIES)
    for category in CATEGORIES:
        row = overlapped["per_class"][str(category["id"])]
        assert (row["TP"], row["FP"], row["FN"]) == tuple(reference[category["id"]][:3])
    scenes[4] = (scenes[4][0][:5], *scenes[4][1:])  # a prediction of the wrong size: the scorer's error
    with pytest.raises(EvaluationError, match=r"id map shape \(5, 32\) differs"):
        evaluate_predictor(_FakePredictor(scenes), dataset, "panoptic", progress=False)


def test_cli_workers_and_engine_flags(tmp_path, capsys, monkeypatch):
    from mask2former.cli import main
    from mask2former.evaluation import panoptic_engine

    write_panoptic_case(tmp_path)
    args = ["eval", "--task", "panoptic", "--no-progress"]
    for flag, name in (("--pred-json", "pred.json"), ("--pred-dir", "pred"), ("--gt-json", "gt.json")):
        args += [flag, str(tmp_path / name)]
    args += ["--gt-dir", str(tmp_path / "gt")]
    assert main([*args, "--workers", "0"]) == 2
    assert "--workers 0: must be at least 1" in capsys.readouterr().err
    reference = [*args, "--engine", "reference"]
    assert main([*reference, "--workers", "2", "--out", str(tmp_path / "two")]) == 0
    assert main([*reference, "--workers", "1", "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "two" / "metrics.json").read_text() == (tmp_path / "one" / "metrics.json").read_text()
    # hotcoco's threads: --workers sets RAYON_NUM_THREADS while it runs, and puts it back.
    seen = []
    real = panoptic_engine.hotcoco_totals
    monkeypatch.setattr(
        panoptic_engine,
        "hotcoco_totals",
        lambda *a: seen.append(os.environ.get("RAYON_NUM_THREADS")) or real(*a),
    )
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    assert main([*args, "--engine", "hotcoco", "--workers", "3", "--out", str(tmp_path / "hotcoco")]) == 0
    assert seen == ["3"] and "RAYON_NUM_THREADS" not in os.environ
    hotcoco = json.loads((tmp_path / "hotcoco" / "metrics.json").read_text())
    assert_same_metrics(hotcoco, json.loads((tmp_path / "one" / "metrics.json").read_text()))
    gt, results = instance_case(6)
    (tmp_path / "instances.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    instance = ["eval", "--task", "instance", "--gt-json", str(tmp_path / "instances.json")]
    instance += ["--pred-json", str(tmp_path / "results.json")]
    for engine in ("hotcoco", "reference"):  # reference: pycocotools
        assert main([*instance, "--engine", engine, "--out", str(tmp_path / f"ap-{engine}")]) == 0
    capsys.readouterr()
    assert (tmp_path / "ap-hotcoco" / "metrics.json").read_text() == (
        tmp_path / "ap-reference" / "metrics.json"
    ).read_text()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_workers_size_hotcocos_thread_pool(tmp_path):
    write_panoptic_case(tmp_path)
    script = (
        "import os, sys, hotcoco.panoptic\n"
        "from mask2former.cli import main\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "assert main(sys.argv[1:]) == 0\n"
        "print('threads added', len(os.listdir('/proc/self/task')) - before)\n"
    )
    args = ["eval", "--task", "panoptic", "--no-progress", "--engine", "hotcoco", "--workers", "3"]
    for flag, name in (("--pred-json", "pred.json"), ("--pred-dir", "pred"), ("--gt-json", "gt.json")):
        args += [flag, str(tmp_path / name)]
    args += ["--gt-dir", str(tmp_path / "gt")]
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "threads added 3"  # rayon's pool, made on first use
