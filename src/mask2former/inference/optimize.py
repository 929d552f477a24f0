"""Result-preserving rewrites that make a model fast for inference.

`optimize_for_inference(model)` folds every FrozenBatchNorm2d into its convolution and, on CPUs with
oneDNN, runs every nn.Linear and nn.Conv2d through oneDNN kernels on weights prepacked once (the kernels
torch.compile's CPU backend uses): both exact up to float rounding. It rewrites the model it is given, so
callers hand it a copy they own (the Predictor does: `inference.predictor.TorchRunner`). What else makes
inference fast needs no switch: without aux outputs the transformer decoder computes the intermediate masks
at attention-mask size and attends through scaled_dot_product_attention with one additive mask broadcast
over heads, and MSDeformAttn takes the corner-gather path in eager mode (`modeling.kernels` chooses).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from mask2former.modeling.kernels import current_kernels
from mask2former.modeling.layers import Conv2d, FrozenBatchNorm2d, fold_frozen_batchnorm


def optimize_for_inference(model: nn.Module, onednn: bool = True) -> nn.Module:
    """Make `model` fast for inference, in place, without changing its results beyond float rounding;
    returns it in eval mode.

    - FrozenBatchNorm2d is folded into its convolution (conv(x) * scale + shift == conv'(x)).
    - `onednn` (when PyTorch has oneDNN): nn.Linear and nn.Conv2d modules become `OneDNNLinear` /
      `OneDNNConv2d`, same parameters and state_dict keys, whose no-grad CPU forward (float32, or bf16/fp16
      weights with inputs of the same dtype) runs oneDNN on a prepacked weight. oneDNN uses AVX-512 wherever
      the CPU has it (MKL's sgemm, behind F.linear, keeps AVX2 on AMD CPUs) and its convolutions return
      channels-last maps, which the next convolution reads without a layout reorder: on the AVX-512 AMD EPYC
      of the benchmarks, linear layers ~1.7x, 1x1 convolutions ~2x. With gradients, on other devices and
      while tracing they are plain nn.Linear/Conv2d.

    Folding is irreversible (the norm modules go away) and the state_dict loses the norm keys: optimise a
    copy you own, never a model that will be saved, exported or trained again.
    """
    fold_frozen_batchnorm(model)
    if onednn and onednn_available():
        for module in model.modules():
            # Exact classes only: a subclass may compute something else in its own forward.
            if type(module) in _ONEDNN_CLASSES:
                _to_onednn(module)
    return model.eval()


def has_frozen_batchnorm(model: nn.Module) -> bool:
    """True while any FrozenBatchNorm2d is left (not folded into a convolution)."""
    return any(isinstance(module, FrozenBatchNorm2d) for module in model.modules())


def onednn_available() -> bool:
    """True when this PyTorch has the oneDNN (mkldnn) prepacked linear and convolution kernels."""
    ops = getattr(torch.ops, "mkldnn", None)
    names = (
        "_linear_pointwise",
        "_reorder_linear_weight",
        "_convolution_pointwise",
        "_reorder_convolution_weight",
    )
    return torch.backends.mkldnn.is_available() and all(hasattr(ops, name) for name in names)


# oneDNN has prepacked linear and convolution kernels in these (bf16/fp16 where the CPU has native support,
# which `inference.precision` checks before a model is converted).
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's prepacked kernels have no backward and no export: inference on CPU, input and weight in the
    same float32 / bfloat16 / float16 dtype."""
    return (
        current_kernels().onednn
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in _ONEDNN_DTYPES
        and not torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
    )


def _packed(module: nn.Module, pack: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The module's weight in oneDNN's layout, packed on first use and again whenever the weight changed
    (moved, reloaded or edited in place: its storage or version counter differ)."""
    key = (module.weight.data_ptr(), module.weight._version)
    if getattr(module, "_onednn_key", None) != key:
        module._onednn_weight = pack(module.weight.detach())
        module._onednn_key = key
    return module._onednn_weight


class _PackedWeightCache:
    """Leaves the packed weight (an opaque oneDNN tensor, which cannot be copied) out of deepcopy and pickle;
    the copy packs its own on first use."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_onednn_weight", None)
        state.pop("_onednn_key", None)
        return state


class OneDNNLinear(_PackedWeightCache, nn.Linear):
    """nn.Linear whose inference runs oneDNN's matmul on a prepacked weight (see optimize_for_inference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _use_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        weight = _packed(self, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None))
        return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")


class OneDNNConv2d(_PackedWeightCache, Conv2d):
    """A Conv2d (with the optional norm and activation of layers.Conv2d) whose inference runs oneDNN's
    convolution on a prepacked weight; its output is channels-last (see optimize_for_inference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or not _use_onednn(x, self.weight):
            x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            weight = _packed(self, lambda w: torch.ops.mkldnn._reorder_convolution_weight(w, *geometry))
            x = torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *geometry, "none", [], "")
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


# nn.MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear: an nn.Linear in all but name.
_ONEDNN_CLASSES = (nn.Linear, NonDynamicallyQuantizableLinear, nn.Conv2d, Conv2d, OneDNNLinear, OneDNNConv2d)


def _to_onednn(module: nn.Module) -> None:
    """Turn an nn.Linear / nn.Conv2d / layers.Conv2d into its oneDNN subclass in place: the same object,
    parameters and state_dict keys, so parents, optimisers and checkpoints keep working."""
    if isinstance(module, nn.Linear):
        module.__class__ = OneDNNLinear
    elif isinstance(module, nn.Conv2d):
        if not isinstance(module, Conv2d):  # a plain nn.Conv2d: no norm nor activation
            module.norm = None
            module.activation = None
        module.__class__ = OneDNNConv2d
