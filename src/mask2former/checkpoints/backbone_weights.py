"""ImageNet-pretrained backbone files mapped strictly onto our backbone (`train --backbone-weights F`).

Layouts read (file formats: torch .pth/.pt through torch's restricted unpickler, plain .pkl through ours,
.safetensors):
- torchvision ResNet-50/101 state dict: `conv1`, `bn1`, `layer{1..4}.{b}.{conv,bn}{1,2,3}`,
  `layer{i}.{b}.downsample.{0,1}`, `fc` (dropped). torchvision's ResNet (v1.5) strides in the 3x3 conv,
  as detectron2 with STRIDE_IN_1X1 False and as ours.
- detectron2's ImageNet files (R-50.pkl / R-101.pkl converted from torchvision by detectron2's
  convert-torchvision-to-d2 script): {"model": {name: numpy}} with `stem.conv1[.norm]`,
  `res{2..5}.{b}.conv{1,2,3}[.norm]`, `res{i}.{b}.shortcut[.norm]`, `stem.fc` (dropped). The MSRA Caffe2
  files use another naming (`res2_0_branch2a_w`), BGR input and the stride in the 1x1 conv: refused.
- Microsoft's Swin release ({"model": state}): the same names as our Swin (`patch_embed`, `layers.{i}.blocks`,
  `layers.{i}.downsample` closing stage i), plus `norm` and `head` (dropped).
- timm's Swin (>= 0.9): `layers.{i}.downsample` opens stage i (i >= 1) and the head is `head.fc`.
Our Swin's per-output norms (`norm0..norm3`) are not in ImageNet files: they keep their initialisation and
are listed as new. Everything else must match by name and shape, or the file is refused in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mask2former.checkpoints.io import DERIVED_BUFFER_SUFFIXES, CheckpointError, _group, key_problems

LAYOUTS = ("torchvision", "detectron2", "swin-microsoft", "swin-timm")


@dataclass
class BackboneReport:
    """What was loaded from a backbone file (keys are our backbone's, without the `backbone.` prefix)."""

    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        new = f"; kept initialised: {_group(self.new)}" if self.new else ""
        dropped = f"; not used from the file: {_group(self.dropped)}" if self.dropped else ""
        where = f"{self.source} ({self.layout} layout)"
        return f"backbone weights: {len(self.loaded)} tensors from {where}{new}{dropped}"


def read_backbone_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat {name: tensor} of a backbone file (.pth/.pt/.pkl/.safetensors), unwrapping "model"."""
    from mask2former.checkpoints.safe_pickle import load_pickled

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as error:  # safetensors raises its own types for damaged files
            raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None
    else:
        obj = load_pickled(path)
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: not a state dict (expected a dict of tensors)")
    state = {}
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            state[str(key)] = value
    if not state:
        raise CheckpointError(f"{path}: holds no arrays")
    return state


def detect_layout(state: dict[str, torch.Tensor], source: str) -> str:
    """Which of LAYOUTS a backbone state dict is in (CheckpointError naming the file otherwise)."""
    keys = set(state)
    if any(re.match(r"res\d_\d+_branch", k) for k in keys) or "conv1_w" in keys:
        raise CheckpointError(
            f"{source}: an MSRA/Caffe2 backbone (BGR input, stride in the 1x1 conv): not this architecture; "
            "use detectron2's torchvision-converted R-50.pkl or a torchvision state dict"
        )
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    if "stem.conv1.weight" in keys and any(k.startswith("res2.") for k in keys):
        return "detectron2"
    if "patch_embed.proj.weight" in keys:
        if "head.fc.weight" in keys or any(k.startswith("layers.3.downsample.") for k in keys):
            return "swin-timm"
        return "swin-microsoft"
    if any(k.startswith("backbone.") for k in keys):
        raise CheckpointError(f"{source}: a whole detection model, not a backbone; use train --init for it")
    raise CheckpointError(
        f"{source}: unknown backbone layout (expected a torchvision ResNet, detectron2 R-50/R-101.pkl, "
        "Microsoft or timm Swin state dict)"
    )


def _torchvision_name(key: str) -> str:
    key = re.sub(r"^conv1\.", "stem.conv1.", key)
    key = re.sub(r"^bn1\.", "stem.conv1.norm.", key)
    key = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", key)
    key = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", key)
    key = key.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
    return key


def _timm_name(key: str) -> str:
    return re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)


def _is_head(key: str, layout: str) -> bool:
    """Classification parts an ImageNet file has and a segmentation backbone does not."""
    if layout == "torchvision":
        return key.startswith("fc.")
    if layout == "detectron2":
        return key.startswith(("stem.fc.", "fc.", "linear."))
    return key.startswith(("head.", "norm."))


def map_to_ours(state: dict[str, torch.Tensor], layout: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our backbone names -> tensors, names of the file not used) for a state dict in `layout`."""
    rename = {"torchvision": _torchvision_name, "swin-timm": _timm_name}.get(layout, lambda key: key)
    mapped, dropped = {}, []
    for key, value in state.items():
        if _is_head(key, layout) or key.endswith(DERIVED_BUFFER_SUFFIXES) or key.endswith("attn_mask"):
            dropped.append(key)
            continue
        mapped[rename(key)] = value
    return mapped, dropped


def load_backbone_weights(model: torch.nn.Module, path: str | Path) -> BackboneReport:
    """Load a pretrained backbone file into `model.backbone` strictly, in place; returns the report.

    Refused in one line: a key of ours with no counterpart (other than Swin's output norms), a key of the
    file with no place in ours, or a shape that differs (e.g. R-101 weights for an R-50 backbone).
    """
    source = str(path)
    state = read_backbone_file(path)
    layout = detect_layout(state, source)
    mapped, dropped = map_to_ours(state, layout)
    backbone = model.backbone
    own = backbone.state_dict()
    optional = re.compile(r"^norm\d+\.")  # Swin's per-output norms: not part of an ImageNet model
    missing = [k for k in own if k not in mapped and not k.endswith(DERIVED_BUFFER_SUFFIXES)]
    required = [k for k in missing if not optional.match(k)]
    unexpected = [k for k in mapped if k not in own]
    problems = key_problems(required, unexpected, mapped, own, limit=6)
    if problems:
        raise CheckpointError(
            f"{source}: {layout} backbone weights do not fit this backbone: " + " | ".join(problems)
        )
    with torch.no_grad():
        for key, value in mapped.items():
            own[key].copy_(value.to(own[key].dtype))
    return BackboneReport(source, layout, loaded=sorted(mapped), new=sorted(missing), dropped=sorted(dropped))
