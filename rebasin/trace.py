"""Build a :class:`~rebasin.spec.PermutationSpec` for an ``nn.Module`` by tracing it.

The model is traced with ``torch.fx``. Every Linear/Conv output gets a fresh *channel
variable*. Ops that are permutation-equivariant pass their input's variable through, and ops
that combine tensors elementwise (a residual ``add``, squeeze-excitation's ``scale * x``)
unify their operands' variables in a union-find. The model's inputs and outputs are *fixed*:
a variable unified with them is not a permutation. Each remaining class of variables becomes
one permutation, named after the first layer producing it (``P_layers.0``).

A value's channels sit on one dim: 1 for ``(N, C, ...)`` conv maps, the last one for
``(..., F)`` features; ``permute``/``transpose`` move it (ConvNeXt's channels-last
LayerNorm), reductions and indexing of other dims keep it. ``flatten`` of a conv map turns
the channels into blocks of ``H * W``, which the spec expresses by putting the channel
permutation on the next Linear's longer input axis. ``torch.cat`` along the channels gives a
value made of blocks, each with its own variable (a :class:`~rebasin.spec.Concat` axis).
Parameters used directly (class tokens, position embeddings, layer scale) follow the channels
they are broadcast against. Modules with known symmetries have their own rules
(:mod:`rebasin.trace_modules`): depthwise convolutions, norms, ``nn.MultiheadAttention`` (heads
and the dimensions inside them), grouped convolutions (groups and the channels inside them),
``nn.TransformerEncoder(Layer)``, ``nn.Embedding``.

Ops not known to be equivariant are allowed only on fixed values (for example preprocessing of
the input); otherwise :class:`UnsupportedModelError` names the module and the op. A variable may
become fixed later in the graph (a residual add with the input), so these checks run once the
whole graph has been visited.

Shapes: without ``example_input``, values are assumed ``(N, C, ...)`` or ``(N, F)``; ops that
need ranks or sizes (concatenation, general reshapes, sequences ``(N, L, F)``) then raise and
ask for an ``example_input``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from rebasin.spec import PermutationSpec
from rebasin.trace_modules import is_known_leaf
from rebasin.trace_ops import TensorOps, arg, dims_arg
from rebasin.trace_state import (
    FIXED,
    Channels,
    Param,
    TupleValue,
    UnsupportedModelError,
    Value,
)

__all__ = ["UnsupportedModelError", "spec_from_module"]

# call_function targets and call_method names, by what they do to channels.
_FUNCTION_KINDS: dict[Callable, str] = {
    **dict.fromkeys(
        [torch.relu, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.mish, F.softplus,
         F.hardtanh, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
         F.dropout, torch.neg, operator.neg, torch.nn.functional.relu_],
        "elementwise",
    ),
    **dict.fromkeys(
        [operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
         operator.imul, torch.add, torch.sub, torch.mul, torch.div],
        "binary",
    ),
    **dict.fromkeys(
        [F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
         F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d],
        "pool",
    ),
    torch.flatten: "flatten",
    torch.reshape: "reshape",
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.mean: "reduce",
    torch.sum: "reduce",
    getattr: "getattr",
    operator.getitem: "getitem",
    torch.cat: "concat",
    torch.concat: "concat",
    F.layer_norm: "layer_norm",
    F.scaled_dot_product_attention: "attention",
}  # fmt: skip
# What a tensor split into attention heads may go through (see _SpecBuilder._split_heads).
_HEAD_KINDS = frozenset({"elementwise", "transpose", "permute", "reshape", "attention"})
_METHOD_KINDS: dict[str, str] = {
    **dict.fromkeys(
        ["relu", "relu_", "sigmoid", "tanh", "neg", "contiguous", "clone", "detach", "to",
         "float", "type_as"],
        "elementwise",
    ),
    **dict.fromkeys(["add", "sub", "mul", "div", "add_", "mul_"], "binary"),
    "flatten": "flatten",
    "view": "reshape",
    "reshape": "reshape",
    "permute": "permute",
    "transpose": "transpose",
    "expand": "expand",
    "mean": "reduce",
    "sum": "reduce",
    "size": "metadata",
    "dim": "metadata",
}  # fmt: skip
# Tensor attributes that are not tensors (x.T would be a tensor, and mixes axes).
_METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})


def spec_from_module(
    model: nn.Module, example_input: torch.Tensor | None = None
) -> PermutationSpec:
    """Trace ``model`` and return the permutation spec of its hidden units.

    Parameters
    ----------
    model
        Any module that ``torch.fx`` can trace.
    example_input
        Optional input batch. When given, the traced graph is run once on it (in eval mode,
        without gradients; training flags are restored) so that tensor shapes are known:
        ``view``/``reshape`` calls are then followed from their shapes, and concatenations,
        sequences and channels-last layouts can be traced.

    Returns
    -------
    PermutationSpec
        Covers every key of ``model.state_dict()``; keys no permutation acts on have all-``None``
        axes. Permutations that the model's inputs or outputs pin down are left out.

    Raises
    ------
    UnsupportedModelError
        If the model cannot be traced, or an op that is not known to be permutation-equivariant
        (a grouped convolution on channels grouped otherwise, GroupNorm with several groups,
        channel shuffle, channel-mixing reshapes, unknown modules or functions) acts on
        permuted channels.
    ValueError
        If ``example_input`` cannot be run through the model.
    """
    try:
        graph = _Tracer().trace(model)
        graph_module = fx.GraphModule(model, graph)
    except Exception as exc:  # tracing runs arbitrary user code, so any error can come back
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: {exc}"
        ) from exc
    shapes = {} if example_input is None else _shapes(model, graph_module, example_input)
    builder = _SpecBuilder(model, shapes)
    for node in graph_module.graph.nodes:
        builder.visit(node)
    return builder.spec()


class _Tracer(fx.Tracer):
    """``torch.fx`` tracer that keeps the modules with their own rules as single calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_known_leaf(m) or super().is_leaf_module(m, module_qualified_name)


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and records the shape of every tensor a node produces."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__(graph_module)
        self.extra_traceback = False  # its error decoration is slow and only adds noise here
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, node: fx.Node) -> object:
        result = super().run_node(node)
        if isinstance(result, torch.Tensor):
            self.shapes[node] = tuple(result.shape)
        return result


def _shapes(
    model: nn.Module, graph_module: fx.GraphModule, x: torch.Tensor
) -> dict[fx.Node, tuple[int, ...]]:
    """Each node's output shape on input ``x``, leaving the model's state as it was."""
    training = {module: module.training for module in model.modules()}
    model.eval()  # no running-statistics updates, no dropout
    recorder = _ShapeRecorder(graph_module)
    try:
        with torch.no_grad():
            recorder.run(x)
    except Exception as exc:
        raise ValueError(
            f"example_input of shape {tuple(x.shape)} cannot be run through "
            f"{type(model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for module, flag in training.items():
            module.training = flag
    return recorder.shapes


class _SpecBuilder(TensorOps):
    """Visits the traced graph in order; the rules are in :mod:`rebasin.trace_ops` and
    :mod:`rebasin.trace_modules`."""

    # --- graph traversal -----------------------------------------------------------------

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.values[node] = Channels(FIXED)  # inputs are fixed
        elif node.op == "get_attr":
            self.values[node] = self._get_attr(node)
        elif node.op == "output":
            for _, x in self._tensor_inputs(node):
                for var in self._vars(x):
                    self.vars.union(var, FIXED)
        elif node.op == "call_module":
            self.values[node] = self.call_module(node, self.model.get_submodule(node.target))
        else:
            table = _METHOD_KINDS if node.op == "call_method" else _FUNCTION_KINDS
            try:
                kind = table.get(node.target, "opaque")
            except TypeError:  # an unhashable callable
                kind = "opaque"
            self.values[node] = self._call(node, kind)

    def _get_attr(self, node: fx.Node) -> Value:
        key = str(node.target)
        if key in self.canonical:
            return Param(self.canonical[key], self.state[key].dim())
        return Channels(FIXED)  # a non-persistent buffer or constant: never permuted

    def _call(self, node: fx.Node, kind: str) -> Value:
        """A function or method call whose effect on channels is ``kind``."""
        if kind == "getattr":
            kind = "metadata" if node.args[1] in _METADATA_ATTRIBUTES else "opaque"
        if kind == "getitem" and isinstance(self.values.get(node.args[0]), TupleValue):
            return self.values[node.args[0]].items[node.args[1]]
        inputs = self._tensor_inputs(node)
        if kind == "metadata" or (kind in ("binary", "getitem") and not inputs):
            return None  # sizes and Python arithmetic on them
        split = [x for _, x in inputs if isinstance(x, Channels) and x.inner is not None]
        if split and kind not in _HEAD_KINDS:
            for x in split:
                self.require(node, x, False, "op on channels split into heads")
            return Channels(FIXED)
        if kind == "attention":
            return self._sdpa(node)
        if kind == "binary":
            return self._combine(node, inputs)
        if kind == "concat":
            return self._concat(node)
        if kind == "layer_norm":
            return self._functional_layer_norm(node)
        if not inputs:
            return Channels(FIXED)  # a tensor made from constants (torch.ones, ...)
        source, x = inputs[0]
        if isinstance(x, Param):
            if kind == "expand":
                return x  # expand only prepends dims: the parameter still aligns from the end
            self.fix_param(x)
            x = Channels(FIXED)
        for _, other in inputs[1:]:
            if isinstance(other, Param):
                self.fix_param(other)
        if x.dim is None:
            return Channels(FIXED)  # fixed from the start: any op is fine
        if kind == "elementwise":
            return self._same_dim(node, source, x)
        if kind == "expand":
            return self._same_dim(node, source, x)
        if kind == "pool":
            self.require(node, x, self.on_dim(source, x, 1), "pooling needs channels on dim 1")
            return x
        if kind == "flatten":
            start, end = arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1)
            return self._flatten(node, source, x, start, end)
        if kind == "reshape":
            return self._reshape(node, source, x)
        if kind == "permute":
            return self._permute(node, source, x, dims_arg(node, 1))
        if kind == "transpose":
            return self._transpose(node, source, x)
        if kind == "reduce":
            return self._reduce(node, source, x)
        if kind == "getitem":
            return self._getitem(node, source, x)
        for _, operand in inputs:
            if isinstance(operand, Channels):
                self.require(node, operand, False, "not known to be permutation-equivariant")
        return Channels(FIXED)
