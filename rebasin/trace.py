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
and the dimensions inside them), ``nn.TransformerEncoder(Layer)``, ``nn.Embedding``.

Ops not known to be equivariant are allowed only on fixed values (for example preprocessing of
the input); otherwise :class:`UnsupportedModelError` names the module and the op. A variable may
become fixed later in the graph (a residual add with the input), so these checks run once the
whole graph has been visited.

Shapes: without ``example_input``, values are assumed ``(N, C, ...)`` or ``(N, F)``; ops that
need ranks or sizes (concatenation, general reshapes, sequences ``(N, L, F)``) then raise and
ask for an ``example_input``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from rebasin.spec import PermutationSpec
from rebasin.trace_modules import (
    FIXED,
    Channels,
    ModuleRules,
    Param,
    TupleValue,
    UnsupportedModelError,
    Value,
    is_known_leaf,
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

_RESHAPE_REMEDY = (
    "pass example_input= (a batch the model accepts) so that the tracer can check shapes, or "
    "give an explicit spec="
)


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
        (grouped convolution, GroupNorm with several groups, channel shuffle, channel-mixing
        reshapes, unknown modules or functions) acts on permuted channels.
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


def _arg(node: fx.Node, index: int, name: str, default: object) -> object:
    """Positional-or-keyword argument ``name`` of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dims_arg(node: fx.Node, first: int) -> list[object]:
    """``x.permute(0, 2, 1)`` and ``x.permute((0, 2, 1))`` alike."""
    dims = list(node.args[first:]) or list(node.kwargs.get("dims", ()))
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = list(dims[0])
    return dims


class _SpecBuilder(ModuleRules):
    """Visits the traced graph in order; module rules are in :class:`ModuleRules`."""

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
            start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
            return self._flatten(node, source, x, start, end)
        if kind == "reshape":
            return self._reshape(node, source, x)
        if kind == "permute":
            return self._permute(node, source, x, _dims_arg(node, 1))
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

    # --- dims ----------------------------------------------------------------------------

    def _same_dim(self, node: fx.Node, source: fx.Node, x: Channels) -> Channels:
        """The channels keep their place counted from the end (elementwise, broadcasting)."""
        end = self.from_end(source, x)
        shape, source_shape = self.shapes.get(node), self.shapes.get(source)
        if end is not None and shape is not None:
            inner = x.inner
            if inner is not None and source_shape is not None:
                inner = len(shape) + inner - len(source_shape)
            return Channels(x.var, len(shape) + end, x.blocks, inner)
        return x

    def _combine(self, node: fx.Node, inputs: list[tuple[fx.Node, Value]]) -> Channels:
        """Elementwise op of tensors (residual add, gating): all operands share permutations."""
        tensors = [(n, x) for n, x in inputs if isinstance(x, Channels)]
        params = [x for _, x in inputs if isinstance(x, Param)]
        if not tensors:
            for param in params:
                self.fix_param(param)
            return Channels(FIXED)
        moving = [(n, x) for n, x in tensors if x.dim is not None]
        if not moving:
            for param in params:
                self.fix_param(param)
            return Channels(FIXED)
        ends = {self.from_end(n, x) for n, x in moving}
        source, first = max(moving, key=lambda item: self.rank(*item) or 0)
        if None in ends:  # ranks unknown: fall back to the raw dims
            same = len({x.dim for _, x in moving}) == 1
        else:
            same = len(ends) == 1
        result = first
        for _, x in moving:
            if x is not first:
                result = self.unify(node, result, x)
        for _, x in tensors:
            if x.dim is None:  # a fixed tensor of the same layout: the channels stay put
                for var in self._vars(result):
                    self.vars.union(var, FIXED)
        result = self._same_dim(node, source, result)
        self.require(node, result, same, "operands carry channels on different dims")
        for param in params:
            self.bind_param(node, param, result)
        return result

    def _flatten(
        self, node: fx.Node, source: fx.Node, x: Channels, start: object, end: object
    ) -> Channels:
        rank = self.rank(source, x)
        dim = self.dim_index(source, x)
        if rank is not None and isinstance(start, int) and isinstance(end, int):
            start, end = start % rank, end % rank
            ends_last = end == rank - 1
        else:
            ends_last = end == -1
        if dim is not None and isinstance(start, int) and isinstance(end, int):
            if start == dim and ends_last:
                # Channels become blocks of the merged trailing dims: scale concat blocks.
                return Channels(x.var, self.last(node), self._scaled(source, x))
            if dim < start:
                return x  # only dims after the channels are merged: their index stays
        if dim is None and x.dim == 1 and start == 1 and ends_last:
            return Channels(x.var, -1, self._scaled(source, x))
        if x.dim == -1 and rank == 2 and start == 1:
            return x  # flattening (N, F) is a no-op
        if x.dim == 1 and rank is None and isinstance(start, int) and start >= 2:
            return x  # only spatial dims are merged
        self.require(node, x, False, "flattening that moves channels is not supported")
        return Channels(x.var, x.dim, x.blocks)

    def _scaled(self, source: fx.Node, x: Channels) -> tuple[tuple[int, int], ...] | None:
        if x.blocks is None:
            return None
        shape = self.shapes[source]  # blocks exist only where shapes are known
        factor = math.prod(shape[self.dim_index(source, x) + 1 :])
        return tuple((var, n * factor) for var, n in x.blocks)

    def _reshape(self, node: fx.Node, source: fx.Node, x: Channels) -> Channels:
        """``view``/``reshape``: followed from shapes when known, else only ``flatten(1)``."""
        in_shape, out_shape = self.shapes.get(source), self.shapes.get(node)
        if in_shape is None or out_shape is None:
            shape = _dims_arg(node, 1) if node.op == "call_method" else _dims_arg(node, 1)
            # view(x.size(0), -1): the batch size is a traced value, the rest is flattened.
            if len(shape) == 2 and isinstance(shape[0], fx.Node) and shape[1] == -1:
                return self._flatten(node, source, x, 1, -1)
            self.require(
                node,
                x,
                False,
                f"reshape that is not flatten(1) may mix channels; {_RESHAPE_REMEDY}",
            )
            return Channels(x.var, x.dim, x.blocks)
        dim = self.dim_index(source, x)
        if x.inner is not None:
            return self._merge_heads(node, x, dim, in_shape, out_shape)
        channels = in_shape[dim]
        before = math.prod(in_shape[:dim])
        after = math.prod(in_shape[dim + 1 :])
        k, prefix = 0, 1
        while k < len(out_shape) and prefix < before:
            prefix *= out_shape[k]
            k += 1
        if prefix == before and k < len(out_shape):
            size = out_shape[k]
            if size == channels:
                return Channels(x.var, k, x.blocks)
            if size % channels == 0 and after % (size // channels) == 0:
                blocks = None
                if x.blocks is not None:
                    blocks = tuple((v, n * (size // channels)) for v, n in x.blocks)
                return Channels(x.var, k, blocks)  # channels lead a merged dim: blocks
            if (
                channels % size == 0
                and k + 1 < len(out_shape)
                and size * out_shape[k + 1] == channels
                and x.blocks is None
            ):
                parts = self.vars.split(x.var, (size, out_shape[k + 1]))
                if parts is not None:
                    return Channels(x.var, k, None, k + 1)  # heads on k, head dims on k + 1
            if channels % size == 0:
                why = (
                    f"reshape from {in_shape} to {out_shape} splits the {channels} channels "
                    "of dim {dim} (a channel shuffle or hand-written attention heads); use "
                    "nn.MultiheadAttention or give an explicit spec="
                ).replace("{dim}", str(dim))
                self.require(node, x, False, why)
                return Channels(FIXED)
        self.require(
            node, x, False,
            f"reshape from {in_shape} to {out_shape} mixes the channels of dim {dim} with other "
            "dims; give an explicit spec=",
        )  # fmt: skip
        return Channels(FIXED)

    def _permute(self, node: fx.Node, source: fx.Node, x: Channels, dims: list) -> Channels:
        rank = len(dims)
        dim = self.dim_index(source, x, rank)
        if dim is None or not all(isinstance(d, int) for d in dims):
            self.require(node, x, False, f"permute of channels needs known dims; {_RESHAPE_REMEDY}")
            return Channels(x.var, x.dim, x.blocks)
        order = [d % rank for d in dims]
        inner = None if x.inner is None else order.index(x.inner)
        return Channels(x.var, order.index(dim), x.blocks, inner)

    def _transpose(self, node: fx.Node, source: fx.Node, x: Channels) -> Channels:
        a, b = _arg(node, 1, "dim0", None), _arg(node, 2, "dim1", None)
        rank = self.rank(source, x)
        dim = self.dim_index(source, x)
        if rank is None or dim is None or not (isinstance(a, int) and isinstance(b, int)):
            self.require(
                node, x, False, f"transpose of channels needs known ranks; {_RESHAPE_REMEDY}"
            )
            return Channels(x.var, x.dim, x.blocks)
        a, b = a % rank, b % rank

        def moved(d: int | None) -> int | None:
            return b if d == a else a if d == b else d

        return Channels(x.var, moved(dim), x.blocks, moved(x.inner))

    def _reduce(self, node: fx.Node, source: fx.Node, x: Channels) -> Channels:
        """``mean``/``sum`` over dims other than the channels'."""
        dims = _arg(node, 1, "dim", None)
        keepdim = bool(_arg(node, 2, "keepdim", False))
        rank = self.rank(source, x)
        dim = self.dim_index(source, x)
        if isinstance(dims, int):
            dims = [dims]
        ok = isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims)
        if not ok or rank is None or dim is None:
            self.require(node, x, False, "reduction over all dims, or dims unknown")
            return Channels(x.var, x.dim, x.blocks)
        reduced = {d % rank for d in dims}
        new_dim = dim if keepdim else dim - sum(1 for d in reduced if d < dim)
        return self._checked(
            node, x, dim not in reduced, "reduction over the channels", Channels(x.var, new_dim)
        )

    def _checked(self, node: fx.Node, x: Channels, ok: bool, why: str, out: Channels) -> Channels:
        self.require(node, x, ok, f"{why} mixes them")
        return out

    def _getitem(self, node: fx.Node, source: fx.Node, x: Channels) -> Channels:
        """Indexing that leaves the channel dim whole (``x[:, 0]`` picks the class token)."""
        index = node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        rank = self.rank(source, x)
        dim = self.dim_index(source, x)
        if rank is None or dim is None or Ellipsis in index:
            self.require(
                node, x, False, f"indexing of channels needs known ranks; {_RESHAPE_REMEDY}"
            )
            return Channels(x.var, x.dim, x.blocks)
        position, out, new_dim, kept = 0, 0, None, True
        for item in index:
            if item is None:  # a new dim of size 1
                out += 1
                continue
            if position == dim:
                kept = item == slice(None)
                new_dim = out
            if isinstance(item, slice):
                out += 1
            elif not isinstance(item, int):
                kept = False  # tensor indices may reorder anything
            position += 1
        if new_dim is None:
            new_dim = out + dim - position
        self.require(node, x, kept, "indexing selects or reorders channels")
        return Channels(x.var, new_dim, x.blocks)

    def _concat(self, node: fx.Node) -> Channels:
        """``torch.cat``: along the channels, blocks; along other dims, one permutation."""
        tensors = _arg(node, 0, "tensors", ())
        dim = _arg(node, 1, "dim", 0)
        values = [(n, self.values[n]) for n in tensors if isinstance(n, fx.Node)]
        moving = [(n, x) for n, x in values if isinstance(x, Channels) and x.dim is not None]
        if not moving:
            for _, x in values:
                if isinstance(x, Param):
                    self.fix_param(x)
            return Channels(FIXED)
        shape = self.shapes.get(node)
        if shape is None or not isinstance(dim, int):
            for _, x in moving:
                self.require(
                    node, x, False, f"concatenation of permuted channels; {_RESHAPE_REMEDY}"
                )
            return Channels(FIXED)
        dim %= len(shape)
        chan_dims = {self.dim_index(n, x) for n, x in moving}
        if len(chan_dims) != 1:
            for _, x in moving:
                self.require(node, x, False, "operands carry channels on different dims")
            return Channels(FIXED)
        chan_dim = chan_dims.pop()
        if chan_dim != dim:  # joined along tokens or space: the channels are shared
            return self._combine(node, values)
        blocks: list[tuple[int, int]] = []
        for n, x in values:
            length = self.shapes[n][dim]
            if isinstance(x, Param):
                self.fix_param(x)
                blocks.append((FIXED, length))
            elif x.dim is None:
                blocks.append((FIXED, length))
            elif x.blocks is not None:
                blocks.extend(x.blocks)
            else:
                blocks.append((x.var, length))
        return Channels(FIXED, dim, tuple(blocks))

    def _functional_layer_norm(self, node: fx.Node) -> Value:
        """``F.layer_norm(x, shape, weight, bias)`` over the channels (LayerNorm2d)."""
        source = node.args[0]
        x = self.values[source]
        shape = _arg(node, 1, "normalized_shape", ())
        params = [_arg(node, i, name, None) for i, name in ((2, "weight"), (3, "bias"))]
        params = [self.values[p] for p in params if isinstance(p, fx.Node)]
        if not isinstance(x, Channels) or x.dim is None:
            for p in params:
                if isinstance(p, Param):
                    self.fix_param(p)
            return Channels(FIXED)
        ok = len(shape) == 1 and self.on_dim(source, x, -1)
        self.require(node, x, ok, "layer_norm must normalise only the last (channel) dim")
        for p in params:
            if isinstance(p, Param):
                self.bind_param(node, p, x)
        return self._same_dim(node, source, x)

    def _merge_heads(
        self,
        node: fx.Node,
        x: Channels,
        dim: int,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
    ) -> Channels:
        """``view(B, L, H * D)`` of heads ``(.., H, D)`` back into one channel dim."""
        inner = x.inner % len(in_shape)
        merged = in_shape[dim] * in_shape[inner]
        before = math.prod(in_shape[:dim])
        k, prefix = 0, 1
        while k < len(out_shape) and prefix < before:
            prefix *= out_shape[k]
            k += 1
        ok = inner == dim + 1 and prefix == before and k < len(out_shape)
        if ok and out_shape[k] == merged:
            return Channels(x.var, k)
        why = (
            "reshape merges channels split into heads in another order (a channel shuffle)"
            if inner == dim - 1
            else f"reshape from {in_shape} to {out_shape} of channels split into heads"
        )
        self.require(node, x, False, why)
        return Channels(FIXED)

    def _sdpa(self, node: fx.Node) -> Value:
        """``F.scaled_dot_product_attention(q, k, v)`` on heads ``(B, H, L, D)``: heads move
        together in q, k and v; q and k share their head dims; the output carries v's."""
        names = ("query", "key", "value")
        args = [node.args[i] if len(node.args) > i else node.kwargs.get(n) for i, n in
                enumerate(names)]  # fmt: skip
        q, k, v = (self.values.get(a) if isinstance(a, fx.Node) else None for a in args)
        operands = [x for x in (q, k, v) if isinstance(x, Channels)]
        if all(x.dim is None for x in operands) and len(operands) == 3:
            return Channels(FIXED)
        layout = {(x.dim, x.inner) for x in operands}
        if len(operands) != 3 or len(layout) != 1 or None in next(iter(layout)):
            for x in operands:
                self.require(
                    node, x, False,
                    "attention needs q, k and v split into heads the same way "
                    "(view(B, L, H, D).transpose(1, 2))",
                )  # fmt: skip
            return Channels(FIXED)
        (hq, dq), (hk, dk), (hv, _) = (self.vars.parts(x.var)[0] for x in (q, k, v))
        self.vars.union(hq, hk)
        self.vars.union(hq, hv)
        self.vars.union(dq, dk)
        return Channels(v.var, q.dim, None, q.inner)
