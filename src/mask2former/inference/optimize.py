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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from mask2former.modeling.deform_attn import MSDeformAttn, SpatialShapes
from mask2former.modeling.deform_attn_fast import sample_from_projection
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
      while tracing they are plain nn.Linear/Conv2d. Their `relu_forward` / `add_forward` fuse the FFNs'
      relu and residual sums into the kernel (`modeling.layers.linear_relu` / `linear_add`).
    - MSDeformAttn becomes `FastMSDeformAttn`: one projection of the query for the sampling offsets and the
      attention logits, then `deform_attn_fast.sample_from_projection`.

    Folding is irreversible (the norm modules go away) and the state_dict loses the norm keys: optimise a
    copy you own, never a model that will be saved, exported or trained again.
    """
    fold_frozen_batchnorm(model)
    for module in model.modules():
        if type(module) is MSDeformAttn:
            module.__class__ = FastMSDeformAttn
            module.onednn_projection = onednn and onednn_available()
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
    return current_kernels().onednn and x.dtype == weight.dtype and _eager_cpu_inference(x)


def _eager_cpu_inference(x: torch.Tensor) -> bool:
    """x is a float32 / bfloat16 / float16 CPU tensor in eager no-grad code (no tracing, export or compile):
    where the inference-only kernels of this module apply."""
    return (
        x.device.type == "cpu"
        and x.dtype in _ONEDNN_DTYPES
        and not torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
    )


def _derived(module: nn.Module, name: str, sources: tuple[torch.Tensor, ...], make: Callable) -> Any:
    """make(*sources detached), kept on the module as `_onednn_<name>`: made on first use and again
    whenever a source changed (moved, reloaded, converted or edited in place: its storage, version counter
    or dtype differ). `_PackedWeightCache` leaves these attributes out of copies."""
    key = tuple((t.data_ptr(), t._version, t.dtype) for t in sources)
    if getattr(module, f"_onednn_{name}_key", None) != key:
        setattr(module, f"_onednn_{name}", make(*(t.detach() for t in sources)))
        setattr(module, f"_onednn_{name}_key", key)
    return getattr(module, f"_onednn_{name}")


def _packed(module: nn.Module, pack: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The module's weight in oneDNN's layout (see `_derived`)."""
    return _derived(module, "weight", (module.weight,), pack)


class _PackedWeightCache:
    """Leaves the weights derived for inference (`_onednn_*` attributes: packed oneDNN tensors, which cannot
    be copied, and merged projections) out of deepcopy and pickle; the copy derives its own on first use."""

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_onednn")}


class OneDNNLinear(_PackedWeightCache, nn.Linear):
    """nn.Linear whose inference runs oneDNN's matmul on a prepacked weight (see optimize_for_inference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _use_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")

    def relu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(self(x)), the relu applied inside oneDNN's kernel (`modeling.layers.linear_relu`)."""
        if not _use_onednn(x, self.weight):
            return F.relu(F.linear(x, self.weight, self.bias))
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "relu", [], "")

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + self(x), the sum taken inside oneDNN's kernel (`modeling.layers.linear_add`)."""
        if not _use_onednn(x, self.weight) or residual.dtype != x.dtype or not residual.is_contiguous():
            return residual + F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self._packed_weight(), self.bias, "add")

    def _packed_weight(self) -> torch.Tensor:
        return _packed(self, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None))


class OneDNNConv2d(_PackedWeightCache, Conv2d):
    """A Conv2d (with the optional norm and activation of layers.Conv2d) whose inference runs oneDNN's
    convolution on a prepacked weight; its output is channels-last (see optimize_for_inference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._onednn_usable(x):
            x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            x = torch.ops.mkldnn._convolution_pointwise(
                x, self._packed_weight(), self.bias, *self._geometry(), "none", [], ""
            )
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def relu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(self(x)), inside oneDNN's kernel when nothing follows the convolution
        (`modeling.layers.conv_relu`)."""
        if self.norm is not None or self.activation is not None or not self._onednn_usable(x):
            return F.relu_(self(x))
        geometry = self._geometry()
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed_weight(), self.bias, *geometry, "relu", [], ""
        )

    def add_relu_forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """relu(self(x) + residual), inside oneDNN's kernel when nothing follows the convolution and the
        residual is a channels-last map of the output's dtype (`modeling.layers.conv_add_relu`)."""
        if (
            self.norm is not None
            or self.activation is not None
            or not self._onednn_usable(x)
            or residual.dtype != x.dtype
            or not residual.is_contiguous(memory_format=torch.channels_last)
        ):
            return F.relu_(self(x) + residual)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, self._packed_weight(), self.bias, *self._geometry(), "add", None, "relu", [], ""
        )

    def _onednn_usable(self, x: torch.Tensor) -> bool:
        return (
            self.padding_mode == "zeros" and not isinstance(self.padding, str) and _use_onednn(x, self.weight)
        )

    def _geometry(self) -> tuple:
        return (list(self.padding), list(self.stride), list(self.dilation), self.groups)

    def _packed_weight(self) -> torch.Tensor:
        geometry = self._geometry()
        return _packed(self, lambda w: torch.ops.mkldnn._reorder_convolution_weight(w, *geometry))


class FastMSDeformAttn(_PackedWeightCache, MSDeformAttn):
    """MSDeformAttn whose no-grad CPU forward projects the query once for both the sampling offsets and the
    attention logits and samples with `deform_attn_fast.sample_from_projection` (same parameters and keys;
    equal up to float rounding). Gradients, tracing, export, other devices and the "reference" / "gather"
    kernels take MSDeformAttn's forward."""

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: SpatialShapes,
    ) -> torch.Tensor:
        """query (B, Lq, C), reference_points (B, Lq, L, 2), input_flatten (B, S, C) -> (B, Lq, C)."""
        if not _fast_sampling(query):
            return super().forward(query, reference_points, input_flatten, spatial_shapes)
        batch = query.shape[0]
        heads = self.num_heads
        value = self.value_proj(input_flatten).view(batch, -1, heads, self.d_model // heads)
        weight, bias, packed = self._merged_projection()
        if self.onednn_projection and _use_onednn(query, weight):
            projection = torch.ops.mkldnn._linear_pointwise(query, packed, bias, "none", [], "")
        else:
            projection = F.linear(query, weight, bias)
        sampled = sample_from_projection(
            value.float(), spatial_shapes, reference_points.float(), projection.float(), self.num_points
        )
        return self.output_proj(sampled.to(query.dtype))

    def _merged_projection(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(weight (3K, C), bias (3K,), weight in oneDNN's layout or None): the x-offset rows, the y-offset
        rows, then the attention rows, K = heads * levels * points; remade whenever one of the four
        parameters changed."""

        def merge(offsets_w, offsets_b, attention_w, attention_b):
            weight = torch.cat((offsets_w[0::2], offsets_w[1::2], attention_w)).contiguous()
            bias = torch.cat((offsets_b[0::2], offsets_b[1::2], attention_b)).contiguous()
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None) if self.onednn_projection else None
            return weight, bias, packed

        parts = (
            self.sampling_offsets.weight,
            self.sampling_offsets.bias,
            self.attention_weights.weight,
            self.attention_weights.bias,
        )
        return _derived(self, "merged", parts, merge)


class OneDNNMultiheadAttention(_PackedWeightCache, nn.MultiheadAttention):
    """nn.MultiheadAttention whose input projections (`modeling.transformer_decoder.multi_head_attention`)
    run oneDNN's matmul on prepacked slices of in_proj_weight in no-grad CPU inference."""

    def in_projection(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Projection `index` (0 query, 1 key, 2 value): (B, L, C) -> (B, L, C)."""
        weight = self.in_proj_weight.chunk(3)[index]
        bias = self.in_proj_bias.chunk(3)[index]
        if not _use_onednn(x, weight):
            return F.linear(x, weight, bias)
        packed = _derived(
            self,
            "in_proj",
            (self.in_proj_weight,),
            lambda w: [torch.ops.mkldnn._reorder_linear_weight(c.contiguous(), None) for c in w.chunk(3)],
        )
        return torch.ops.mkldnn._linear_pointwise(x, packed[index], bias, "none", [], "")


def _fast_sampling(query: torch.Tensor) -> bool:
    """FastMSDeformAttn's own path applies: CPU inference in float32 / bf16 / fp16, eager, with the
    "auto" or "fast" deformable-attention kernel."""
    return current_kernels().deform_attn in ("auto", "fast") and _eager_cpu_inference(query)


# nn.MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear: an nn.Linear in all but name.
_ONEDNN_CLASSES = (
    nn.Linear,
    NonDynamicallyQuantizableLinear,
    nn.Conv2d,
    Conv2d,
    nn.MultiheadAttention,
    OneDNNLinear,
    OneDNNConv2d,
    OneDNNMultiheadAttention,
)


def _to_onednn(module: nn.Module) -> None:
    """Turn an nn.Linear / nn.Conv2d / layers.Conv2d / nn.MultiheadAttention into its oneDNN subclass in
    place: the same object, parameters and state_dict keys, so parents, optimisers and checkpoints keep
    working."""
    if isinstance(module, nn.MultiheadAttention):
        module.__class__ = OneDNNMultiheadAttention
    elif isinstance(module, nn.Linear):
        module.__class__ = OneDNNLinear
    elif isinstance(module, nn.Conv2d):
        if not isinstance(module, Conv2d):  # a plain nn.Conv2d: no norm nor activation
            module.norm = None
            module.activation = None
        module.__class__ = OneDNNConv2d
