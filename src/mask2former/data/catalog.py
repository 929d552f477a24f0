"""Class catalogs of the datasets the official models were trained on.

A model predicts contiguous class indices 0..K-1 (K+1 = "no object"); `DatasetMeta` maps them to names,
thing/stuff flags, the dataset's own category ids (what COCO json files use) and display colours.
Names, ids, flags and colours are the ones of detectron2's COCO panoptic table (from panopticapi) and
Mask2Former's ADE20K-150 table, in the same order, so indices line up with the released checkpoints.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class DatasetMeta:
    """Per contiguous class index k: class_names[k], thing_classes[k], category_ids[k], colors[k]."""

    name: str
    class_names: list[str]
    thing_classes: list[bool]
    category_ids: list[int]
    colors: list[tuple[int, int, int]]
    ignore_label: int = 255
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {len(self.class_names), len(self.thing_classes), len(self.category_ids), len(self.colors)}
        if len(sizes) != 1:
            raise ValueError(f"dataset {self.name!r}: names, thing flags, ids and colours differ in length")
        if len(set(self.category_ids)) != len(self.category_ids):
            raise ValueError(f"dataset {self.name!r}: category ids are not unique")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def contiguous_index(self, category_id: int) -> int:
        """Dataset category id -> contiguous class index (ValueError when unknown)."""
        try:
            return self.category_ids.index(category_id)
        except ValueError:
            raise ValueError(f"dataset {self.name!r} has no category id {category_id}") from None


# COCO panoptic 2017: (category id, name, colour); the 80 things come first, then 53 stuff classes.
_COCO_THINGS = [
    (1, "person", (220, 20, 60)),
    (2, "bicycle", (119, 11, 32)),
    (3, "car", (0, 0, 142)),
    (4, "motorcycle", (0, 0, 230)),
    (5, "airplane", (106, 0, 228)),
    (6, "bus", (0, 60, 100)),
    (7, "train", (0, 80, 100)),
    (8, "truck", (0, 0, 70)),
    (9, "boat", (0, 0, 192)),
    (10, "traffic light", (250, 170, 30)),
    (11, "fire hydrant", (100, 170, 30)),
    (13, "stop sign", (220, 220, 0)),
    (14, "parking meter", (175, 116, 175)),
    (15, "bench", (250, 0, 30)),
    (16, "bird", (165, 42, 42)),
    (17, "cat", (255, 77, 255)),
    (18, "dog", (0, 226, 252)),
    (19, "horse", (182, 182, 255)),
    (20, "sheep", (0, 82, 0)),
    (21, "cow", (120, 166, 157)),
    (22, "elephant", (110, 76, 0)),
    (23, "bear", (174, 57, 255)),
    (24, "zebra", (199, 100, 0)),
    (25, "giraffe", (72, 0, 118)),
    (27, "backpack", (255, 179, 240)),
    (28, "umbrella", (0, 125, 92)),
    (31, "handbag", (209, 0, 151)),
    (32, "tie", (188, 208, 182)),
    (33, "suitcase", (0, 220, 176)),
    (34, "frisbee", (255, 99, 164)),
    (35, "skis", (92, 0, 73)),
    (36, "snowboard", (133, 129, 255)),
    (37, "sports ball", (78, 180, 255)),
    (38, "kite", (0, 228, 0)),
    (39, "baseball bat", (174, 255, 243)),
    (40, "baseball glove", (45, 89, 255)),
    (41, "skateboard", (134, 134, 103)),
    (42, "surfboard", (145, 148, 174)),
    (43, "tennis racket", (255, 208, 186)),
    (44, "bottle", (197, 226, 255)),
    (46, "wine glass", (171, 134, 1)),
    (47, "cup", (109, 63, 54)),
    (48, "fork", (207, 138, 255)),
    (49, "knife", (151, 0, 95)),
    (50, "spoon", (9, 80, 61)),
    (51, "bowl", (84, 105, 51)),
    (52, "banana", (74, 65, 105)),
    (53, "apple", (166, 196, 102)),
    (54, "sandwich", (208, 195, 210)),
    (55, "orange", (255, 109, 65)),
    (56, "broccoli", (0, 143, 149)),
    (57, "carrot", (179, 0, 194)),
    (58, "hot dog", (209, 99, 106)),
    (59, "pizza", (5, 121, 0)),
    (60, "donut", (227, 255, 205)),
    (61, "cake", (147, 186, 208)),
    (62, "chair", (153, 69, 1)),
    (63, "couch", (3, 95, 161)),
    (64, "potted plant", (163, 255, 0)),
    (65, "bed", (119, 0, 170)),
    (67, "dining table", (0, 182, 199)),
    (70, "toilet", (0, 165, 120)),
    (72, "tv", (183, 130, 88)),
    (73, "laptop", (95, 32, 0)),
    (74, "mouse", (130, 114, 135)),
    (75, "remote", (110, 129, 133)),
    (76, "keyboard", (166, 74, 118)),
    (77, "cell phone", (219, 142, 185)),
    (78, "microwave", (79, 210, 114)),
    (79, "oven", (178, 90, 62)),
    (80, "toaster", (65, 70, 15)),
    (81, "sink", (127, 167, 115)),
    (82, "refrigerator", (59, 105, 106)),
    (84, "book", (142, 108, 45)),
    (85, "clock", (196, 172, 0)),
    (86, "vase", (95, 54, 80)),
    (87, "scissors", (128, 76, 255)),
    (88, "teddy bear", (201, 57, 1)),
    (89, "hair drier", (246, 0, 122)),
    (90, "toothbrush", (191, 162, 208)),
]

_COCO_STUFF = [
    (92, "banner", (255, 255, 128)),
    (93, "blanket", (147, 211, 203)),
    (95, "bridge", (150, 100, 100)),
    (100, "cardboard", (168, 171, 172)),
    (107, "counter", (146, 112, 198)),
    (109, "curtain", (210, 170, 100)),
    (112, "door-stuff", (92, 136, 89)),
    (118, "floor-wood", (218, 88, 184)),
    (119, "flower", (241, 129, 0)),
    (122, "fruit", (217, 17, 255)),
    (125, "gravel", (124, 74, 181)),
    (128, "house", (70, 70, 70)),
    (130, "light", (255, 228, 255)),
    (133, "mirror-stuff", (154, 208, 0)),
    (138, "net", (193, 0, 92)),
    (141, "pillow", (76, 91, 113)),
    (144, "platform", (255, 180, 195)),
    (145, "playingfield", (106, 154, 176)),
    (147, "railroad", (230, 150, 140)),
    (148, "river", (60, 143, 255)),
    (149, "road", (128, 64, 128)),
    (151, "roof", (92, 82, 55)),
    (154, "sand", (254, 212, 124)),
    (155, "sea", (73, 77, 174)),
    (156, "shelf", (255, 160, 98)),
    (159, "snow", (255, 255, 255)),
    (161, "stairs", (104, 84, 109)),
    (166, "tent", (169, 164, 131)),
    (168, "towel", (225, 199, 255)),
    (171, "wall-brick", (137, 54, 74)),
    (175, "wall-stone", (135, 158, 223)),
    (176, "wall-tile", (7, 246, 231)),
    (177, "wall-wood", (107, 255, 200)),
    (178, "water-other", (58, 41, 149)),
    (180, "window-blind", (183, 121, 142)),
    (181, "window-other", (255, 73, 97)),
    (184, "tree-merged", (107, 142, 35)),
    (185, "fence-merged", (190, 153, 153)),
    (186, "ceiling-merged", (146, 139, 141)),
    (187, "sky-other-merged", (70, 130, 180)),
    (188, "cabinet-merged", (134, 199, 156)),
    (189, "table-merged", (209, 226, 140)),
    (190, "floor-other-merged", (96, 36, 108)),
    (191, "pavement-merged", (96, 96, 96)),
    (192, "mountain-merged", (64, 170, 64)),
    (193, "grass-merged", (152, 251, 152)),
    (194, "dirt-merged", (208, 229, 228)),
    (195, "paper-merged", (206, 186, 171)),
    (196, "food-other-merged", (152, 161, 64)),
    (197, "building-other-merged", (116, 112, 0)),
    (198, "rock-merged", (0, 114, 143)),
    (199, "wall-other-merged", (102, 102, 156)),
    (200, "rug-merged", (250, 141, 255)),
]

# ADE20K SceneParsing, 150 classes in label order (label value = index, 0..149 after the usual
# "minus one" conversion); thing flag from Mask2Former's ADE20K panoptic split (100 things, 50 stuff).
# The official name "window " carries a trailing space; it is stripped here.
_ADE20K = [
    ("wall", 0, (120, 120, 120)),
    ("building", 0, (180, 120, 120)),
    ("sky", 0, (6, 230, 230)),
    ("floor", 0, (80, 50, 50)),
    ("tree", 0, (4, 200, 3)),
    ("ceiling", 0, (120, 120, 80)),
    ("road, route", 0, (140, 140, 140)),
    ("bed", 1, (204, 5, 255)),
    ("window", 1, (230, 230, 230)),
    ("grass", 0, (4, 250, 7)),
    ("cabinet", 1, (224, 5, 255)),
    ("sidewalk, pavement", 0, (235, 255, 7)),
    ("person", 1, (150, 5, 61)),
    ("earth, ground", 0, (120, 120, 70)),
    ("door", 1, (8, 255, 51)),
    ("table", 1, (255, 6, 82)),
    ("mountain, mount", 0, (143, 255, 140)),
    ("plant", 0, (204, 255, 4)),
    ("curtain", 1, (255, 51, 7)),
    ("chair", 1, (204, 70, 3)),
    ("car", 1, (0, 102, 200)),
    ("water", 0, (61, 230, 250)),
    ("painting, picture", 1, (255, 6, 51)),
    ("sofa", 1, (11, 102, 255)),
    ("shelf", 1, (255, 7, 71)),
    ("house", 0, (255, 9, 224)),
    ("sea", 0, (9, 7, 230)),
    ("mirror", 1, (220, 220, 220)),
    ("rug", 0, (255, 9, 92)),
    ("field", 0, (112, 9, 255)),
    ("armchair", 1, (8, 255, 214)),
    ("seat", 1, (7, 255, 224)),
    ("fence", 1, (255, 184, 6)),
    ("desk", 1, (10, 255, 71)),
    ("rock, stone", 0, (255, 41, 10)),
    ("wardrobe, closet, press", 1, (7, 255, 255)),
    ("lamp", 1, (224, 255, 8)),
    ("tub", 1, (102, 8, 255)),
    ("rail", 1, (255, 61, 6)),
    ("cushion", 1, (255, 194, 7)),
    ("base, pedestal, stand", 0, (255, 122, 8)),
    ("box", 1, (0, 255, 20)),
    ("column, pillar", 1, (255, 8, 41)),
    ("signboard, sign", 1, (255, 5, 153)),
    ("chest of drawers, chest, bureau, dresser", 1, (6, 51, 255)),
    ("counter", 1, (235, 12, 255)),
    ("sand", 0, (160, 150, 20)),
    ("sink", 1, (0, 163, 255)),
    ("skyscraper", 0, (140, 140, 140)),
    ("fireplace", 1, (250, 10, 15)),
    ("refrigerator, icebox", 1, (20, 255, 0)),
    ("grandstand, covered stand", 0, (31, 255, 0)),
    ("path", 0, (255, 31, 0)),
    ("stairs", 1, (255, 224, 0)),
    ("runway", 0, (153, 255, 0)),
    ("case, display case, showcase, vitrine", 1, (0, 0, 255)),
    ("pool table, billiard table, snooker table", 1, (255, 71, 0)),
    ("pillow", 1, (0, 235, 255)),
    ("screen door, screen", 1, (0, 173, 255)),
    ("stairway, staircase", 0, (31, 0, 255)),
    ("river", 0, (11, 200, 200)),
    ("bridge, span", 0, (255, 82, 0)),
    ("bookcase", 1, (0, 255, 245)),
    ("blind, screen", 0, (0, 61, 255)),
    ("coffee table", 1, (0, 255, 112)),
    ("toilet, can, commode, crapper, pot, potty, stool, throne", 1, (0, 255, 133)),
    ("flower", 1, (255, 0, 0)),
    ("book", 1, (255, 163, 0)),
    ("hill", 0, (255, 102, 0)),
    ("bench", 1, (194, 255, 0)),
    ("countertop", 1, (0, 143, 255)),
    ("stove", 1, (51, 255, 0)),
    ("palm, palm tree", 1, (0, 82, 255)),
    ("kitchen island", 1, (0, 255, 41)),
    ("computer", 1, (0, 255, 173)),
    ("swivel chair", 1, (10, 0, 255)),
    ("boat", 1, (173, 255, 0)),
    ("bar", 0, (0, 255, 153)),
    ("arcade machine", 1, (255, 92, 0)),
    ("hovel, hut, hutch, shack, shanty", 0, (255, 0, 255)),
    ("bus", 1, (255, 0, 245)),
    ("towel", 1, (255, 0, 102)),
    ("light", 1, (255, 173, 0)),
    ("truck", 1, (255, 0, 20)),
    ("tower", 0, (255, 184, 184)),
    ("chandelier", 1, (0, 31, 255)),
    ("awning, sunshade, sunblind", 1, (0, 255, 61)),
    ("street lamp", 1, (0, 71, 255)),
    ("booth", 1, (255, 0, 204)),
    ("tv", 1, (0, 255, 194)),
    ("plane", 1, (0, 255, 82)),
    ("dirt track", 0, (0, 10, 255)),
    ("clothes", 1, (0, 112, 255)),
    ("pole", 1, (51, 0, 255)),
    ("land, ground, soil", 0, (0, 194, 255)),
    ("bannister, banister, balustrade, balusters, handrail", 1, (0, 122, 255)),
    ("escalator, moving staircase, moving stairway", 0, (0, 255, 163)),
    ("ottoman, pouf, pouffe, puff, hassock", 1, (255, 153, 0)),
    ("bottle", 1, (0, 255, 10)),
    ("buffet, counter, sideboard", 0, (255, 112, 0)),
    ("poster, posting, placard, notice, bill, card", 0, (143, 255, 0)),
    ("stage", 0, (82, 0, 255)),
    ("van", 1, (163, 255, 0)),
    ("ship", 1, (255, 235, 0)),
    ("fountain", 1, (8, 184, 170)),
    ("conveyer belt, conveyor belt, conveyer, conveyor, transporter", 0, (133, 0, 255)),
    ("canopy", 0, (0, 255, 92)),
    ("washer, automatic washer, washing machine", 1, (184, 0, 255)),
    ("plaything, toy", 1, (255, 0, 31)),
    ("pool", 0, (0, 184, 255)),
    ("stool", 1, (0, 214, 255)),
    ("barrel, cask", 1, (255, 0, 112)),
    ("basket, handbasket", 1, (92, 255, 0)),
    ("falls", 0, (0, 224, 255)),
    ("tent", 0, (112, 224, 255)),
    ("bag", 1, (70, 184, 160)),
    ("minibike, motorbike", 1, (163, 0, 255)),
    ("cradle", 0, (153, 0, 255)),
    ("oven", 1, (71, 255, 0)),
    ("ball", 1, (255, 0, 163)),
    ("food, solid food", 1, (255, 204, 0)),
    ("step, stair", 1, (255, 0, 143)),
    ("tank, storage tank", 0, (0, 255, 235)),
    ("trade name", 1, (133, 255, 0)),
    ("microwave", 1, (255, 0, 235)),
    ("pot", 1, (245, 0, 255)),
    ("animal", 1, (255, 0, 122)),
    ("bicycle", 1, (255, 245, 0)),
    ("lake", 0, (10, 190, 212)),
    ("dishwasher", 1, (214, 255, 0)),
    ("screen", 1, (0, 204, 255)),
    ("blanket, cover", 0, (20, 0, 255)),
    ("sculpture", 1, (255, 255, 0)),
    ("hood, exhaust hood", 1, (0, 153, 255)),
    ("sconce", 1, (0, 41, 255)),
    ("vase", 1, (0, 255, 204)),
    ("traffic light", 1, (41, 0, 255)),
    ("tray", 1, (41, 255, 0)),
    ("trash can", 1, (173, 0, 255)),
    ("fan", 1, (0, 245, 255)),
    ("pier", 0, (71, 0, 255)),
    ("crt screen", 0, (122, 0, 255)),
    ("plate", 1, (0, 255, 184)),
    ("monitor", 1, (0, 92, 255)),
    ("bulletin board", 1, (184, 255, 0)),
    ("shower", 0, (0, 133, 255)),
    ("radiator", 1, (255, 214, 0)),
    ("glass, drinking glass", 1, (25, 194, 194)),
    ("clock", 1, (102, 255, 0)),
    ("flag", 1, (92, 0, 255)),
]


def coco_panoptic() -> DatasetMeta:
    """COCO panoptic: 133 classes (80 things then 53 stuff), panoptic category ids 1..200."""
    rows = [(cid, name, color, True) for cid, name, color in _COCO_THINGS]
    rows += [(cid, name, color, False) for cid, name, color in _COCO_STUFF]
    return DatasetMeta(
        name="coco_panoptic",
        class_names=[row[1] for row in rows],
        thing_classes=[row[3] for row in rows],
        category_ids=[row[0] for row in rows],
        colors=[row[2] for row in rows],
    )


def coco_instance() -> DatasetMeta:
    """COCO instance: the 80 thing classes, category ids 1..90 (with the usual gaps)."""
    return DatasetMeta(
        name="coco_instance",
        class_names=[name for _, name, _ in _COCO_THINGS],
        thing_classes=[True] * len(_COCO_THINGS),
        category_ids=[cid for cid, _, _ in _COCO_THINGS],
        colors=[color for _, _, color in _COCO_THINGS],
    )


def ade20k_semantic() -> DatasetMeta:
    """ADE20K SceneParsing: 150 classes, category id = label value 0..149, 255 ignored."""
    return DatasetMeta(
        name="ade20k_semantic",
        class_names=[name for name, _, _ in _ADE20K],
        thing_classes=[bool(flag) for _, flag, _ in _ADE20K],
        category_ids=list(range(len(_ADE20K))),
        colors=[color for _, _, color in _ADE20K],
    )


_CATALOG: dict[str, Callable[[], DatasetMeta]] = {
    "coco_panoptic": coco_panoptic,
    "coco_instance": coco_instance,
    "ade20k_semantic": ade20k_semantic,
}

# Datasets defined next to their own code; importing the module registers them (see register_meta).
_LAZY_MODULES = {"synth": "mask2former.data.synth"}


def register_meta(name: str, factory: Callable[[], DatasetMeta]) -> None:
    """Make `get_meta(name)` return `factory()` (custom datasets, the synthetic scenes)."""
    _CATALOG[name] = factory


def available() -> list[str]:
    """Names `get_meta` knows about."""
    return sorted(set(_CATALOG) | set(_LAZY_MODULES))


def get_meta(name: str) -> DatasetMeta:
    """A fresh DatasetMeta for dataset `name`; ValueError listing the known names otherwise."""
    if name not in _CATALOG and name in _LAZY_MODULES:
        module = importlib.import_module(_LAZY_MODULES[name])
        # A module that does not call register_meta may still expose a `<name>_meta()` function.
        factory = getattr(module, f"{name}_meta", None)
        if name not in _CATALOG and callable(factory):
            register_meta(name, factory)
    if name not in _CATALOG:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(available())}")
    return _CATALOG[name]()
