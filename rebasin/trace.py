"""Build a :class:`~rebasin.spec.PermutationSpec` for an ``nn.Module`` by tracing it.

The model is traced with ``torch.fx``. Every Linear/Conv output gets a fresh *channel
variable*. Ops that are permutation-equivariant pass their input's variable through, and ops
that combine tensors elementwise (a residual ``add``) unify their operands' variables in a
union-find. The model's inputs and outputs are *fixed*: a variable unified with them is not a
permutation. Each remaining class of variables becomes one permutation, named after the first
layer producing it (``P_layers.0``).

A value's channels sit either on dim 1 (``(N, C, ...)`` conv feature maps) or on the last dim
(``(N, F)`` Linear features). ``flatten`` of a conv map turns the channels into blocks of
``H * W`` on the last dim, which the spec expresses by putting the channel permutation on the
next Linear's longer input axis.

Ops not known to be equivariant are allowed only on fixed values (for example preprocessing of
the input); otherwise :class:`UnsupportedModelError` names the module and the op. A variable may
become fixed later in the graph (a residual add with the input), so these checks run once the
whole graph has been visited.

Limitations: channel-last tensors with more than two dims (sequences ``(N, L, F)``) are only
told apart from ``(N, F)`` when an ``example_input`` gives shapes; concatenation along channels
is not supported (its permutation would be block-diagonal, which one name cannot express).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from rebasin.spec import PermutationSpec, SpecError

FIXED = 0  # union-find class of "never permuted": model inputs, outputs, parameters used directly


class UnsupportedModelError(SpecError):
    """The model contains an op that cannot be shown to be permutation-equivariant."""


@dataclass(frozen=True)
class _Channels:
    """A traced tensor: its channel variable and the dim its channels sit on.

    ``dim`` is 1 for ``(N, C, ...)`` maps, -1 for ``(..., F)`` features and ``None`` for values
    that are fixed from the start (their layout does not matter).
    """

    var: int
    dim: int | None = None


# Values of traced nodes: _Channels for tensors, None for Python values (sizes, ints).
Value = _Channels | None

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Softplus, nn.Mish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
)  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# call_function targets and call_method names, by what they do to channels.
_FUNCTION_KINDS: dict[Callable, str] = {
    **dict.fromkeys(
        [torch.relu, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.mish, F.softplus,
         F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, torch.neg,
         operator.neg],
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
    getattr: "getattr",
    operator.getitem: "getitem",
    torch.cat: "concat",
    torch.concat: "concat",
}  # fmt: skip
_METHOD_KINDS: dict[str, str] = {
    **dict.fromkeys(
        ["relu", "sigmoid", "tanh", "neg", "contiguous", "clone", "detach", "to", "float"],
        "elementwise",
    ),
    **dict.fromkeys(["add", "sub", "mul", "div"], "binary"),
    "flatten": "flatten",
    "view": "reshape",
    "reshape": "reshape",
    "size": "metadata",
    "dim": "metadata",
}
# Tensor attributes that are not tensors (x.T would be a tensor, and mixes axes).
_METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})


def spec_from_module(
    model: nn.Module, example_input: torch.Tensor | None = None
) -> PermutationSpec:
    """Trace ``model`` and return the permutation spec of its hidden units.

    Parameters
    ----------
    model
        Any module that ``torch.fx.symbolic_trace`` can trace.
    example_input
        Optional input batch. When given, the traced graph is run once on it (in eval mode,
        without gradients; training flags are restored) so that tensor shapes can be checked:
        ``view``/``reshape`` calls are then recognised as flattening from their shapes.

    Returns
    -------
    PermutationSpec
        Covers every key of ``model.state_dict()``; keys no permutation acts on have all-``None``
        axes. Permutations that the model's inputs or outputs pin down are left out.

    Raises
    ------
    UnsupportedModelError
        If the model cannot be traced, or an op that is not known to be permutation-equivariant
        (grouped conv, GroupNorm with several groups, attention, channel-mixing reshapes,
        unknown modules or functions) acts on permuted channels.
    ValueError
        If ``example_input`` cannot be run through the model.
    """
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as exc:  # tracing runs arbitrary user code, so any error can come back
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: {exc}"
        ) from exc
    shapes = {} if example_input is None else _shapes(model, graph_module, example_input)
    builder = _SpecBuilder(model, shapes)
    for node in graph_module.graph.nodes:
        builder.visit(node)
    return builder.spec()


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


class _ChannelVariables:
    """Union-find over channel variables; the class of ``FIXED`` is never permuted."""

    def __init__(self) -> None:
        self.parent: list[int] = [FIXED]
        self.origin: list[str] = ["<fixed>"]  # the layer that created each variable

    def new(self, origin: str) -> int:
        self.parent.append(len(self.parent))
        self.origin.append(origin)
        return len(self.parent) - 1

    def find(self, var: int) -> int:
        while self.parent[var] != var:
            self.parent[var] = self.parent[self.parent[var]]
            var = self.parent[var]
        return var

    def union(self, a: int, b: int) -> int:
        # The smaller id becomes the root: FIXED wins, otherwise the earliest layer names it.
        root_a, root_b = self.find(a), self.find(b)
        root = min(root_a, root_b)
        self.parent[max(root_a, root_b)] = root
        return root

    def is_fixed(self, var: int) -> bool:
        return self.find(var) == FIXED


class _SpecBuilder:
    """Visits the traced graph in order and collects channel variables per state-dict axis."""

    def __init__(self, model: nn.Module, shapes: dict[fx.Node, tuple[int, ...]]) -> None:
        self.model = model
        self.shapes = shapes  # empty without an example input
        self.vars = _ChannelVariables()
        self.values: dict[fx.Node, Value] = {}
        self.axis_vars: dict[tuple[str, int], int] = {}
        self.module_outputs: dict[str, int] = {}  # a module called twice keeps one variable
        self.checks: list[tuple[int, str]] = []  # (variable that must end fixed, why)
        self.state = model.state_dict(keep_vars=True)
        # Tied parameters appear under several keys; bind them all through the first key.
        first_key: dict[int, str] = {}
        self.canonical = {k: first_key.setdefault(id(t), k) for k, t in self.state.items()}

    # --- results -------------------------------------------------------------------------

    def spec(self) -> PermutationSpec:
        for var, message in self.checks:
            if not self.vars.is_fixed(var):
                raise UnsupportedModelError(message)
        return PermutationSpec(
            {
                key: tuple(self._perm_name(self.canonical[key], axis) for axis in range(t.dim()))
                for key, t in self.state.items()
            }
        )

    def _perm_name(self, key: str, axis: int) -> str | None:
        var = self.axis_vars.get((key, axis))
        if var is None or self.vars.is_fixed(var):
            return None
        return f"P_{self.vars.origin[self.vars.find(var)]}"

    # --- bookkeeping ---------------------------------------------------------------------

    def _bind(self, key: str, axis: int, var: int) -> None:
        """Record that channel variable ``var`` acts on ``axis`` of state-dict entry ``key``."""
        if key not in self.canonical:  # a non-persistent buffer
            return
        key = self.canonical[key]
        if (key, axis) in self.axis_vars:
            self.axis_vars[(key, axis)] = self.vars.union(self.axis_vars[(key, axis)], var)
        else:
            self.axis_vars[(key, axis)] = var

    def _require(self, node: fx.Node, x: _Channels, ok: bool, why: str) -> None:
        """Unless ``ok``, the op is only valid if ``x`` ends up fixed (checked at the end)."""
        if not ok:
            self.checks.append((x.var, f"{self._describe(node)}: {why}"))

    def _describe(self, node: fx.Node) -> str:
        """Where the op sits (module qualified name and type) and what it is."""
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            return f"module {node.target!r} ({type(module).__name__})"
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        if stack:
            path, cls = stack[-1]
            where = f"module {path!r} ({getattr(cls, '__name__', cls)})"
        else:
            where = f"{type(self.model).__name__}.forward"
        if node.op == "call_method":
            return f"{where}, method .{node.target}()"
        target = node.target
        module_name = getattr(target, "__module__", None) or "torch"
        module_name = {"_operator": "operator"}.get(module_name, module_name)
        return f"{where}, function {module_name}.{getattr(target, '__name__', target)}"

    def _rank(self, node: fx.Node, x: _Channels) -> int | None:
        """Rank of a node's tensor; without shapes, features are taken to be ``(N, F)``."""
        shape = self.shapes.get(node)
        if shape is not None:
            return len(shape)
        return 2 if x.dim == -1 else None

    def _on_dim(self, node: fx.Node, x: _Channels, dim: int) -> bool:
        """Whether ``x``'s channels sit on ``dim`` (1 and -1 coincide for ``(N, C)``)."""
        return x.dim == dim or (x.dim is not None and self._rank(node, x) == 2)

    def _tensor_inputs(self, node: fx.Node) -> list[tuple[fx.Node, _Channels]]:
        return [(n, v) for n in node.all_input_nodes if (v := self.values[n]) is not None]

    # --- graph traversal -----------------------------------------------------------------

    def visit(self, node: fx.Node) -> None:
        if node.op in ("placeholder", "get_attr"):
            # Inputs are fixed; so are parameters used directly (they would need a permutation
            # the spec does not give them).
            self.values[node] = _Channels(FIXED)
        elif node.op == "output":
            for _, x in self._tensor_inputs(node):
                self.vars.union(x.var, FIXED)
        elif node.op == "call_module":
            self.values[node] = self._call_module(node, self.model.get_submodule(node.target))
        else:
            table = _METHOD_KINDS if node.op == "call_method" else _FUNCTION_KINDS
            try:
                kind = table.get(node.target, "opaque")
            except TypeError:  # an unhashable callable
                kind = "opaque"
            self.values[node] = self._call(node, kind)

    def _call(self, node: fx.Node, kind: str) -> Value:
        """A function or method call whose effect on channels is ``kind``."""
        inputs = self._tensor_inputs(node)
        if kind == "getattr":
            kind = "metadata" if node.args[1] in _METADATA_ATTRIBUTES else "opaque"
        if kind == "metadata" or (kind in ("binary", "getitem") and not inputs):
            return None  # sizes and Python arithmetic on them
        if kind == "binary":
            return self._combine(node, [x for _, x in inputs])
        if not inputs:
            return _Channels(FIXED)  # a tensor made from constants (torch.ones, ...)
        source, x = inputs[0]
        if kind == "elementwise":
            return x
        if kind == "pool":
            self._require(node, x, x.dim == 1, "pooling needs channels on dim 1 (N, C, ...)")
            return x
        if kind == "flatten":
            start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
            return self._flatten(node, source, x, start, end)
        if kind == "reshape":
            return self._reshape(node, source, x)
        if kind == "concat":
            why = (
                "concatenation is not supported: a permutation of the joined axis is "
                "block-diagonal, which a single permutation name cannot express"
            )
        else:
            why = "not known to be permutation-equivariant on channels"
        for _, operand in inputs:
            self._require(node, operand, False, why)
        return _Channels(FIXED)

    def _combine(self, node: fx.Node, operands: list[_Channels]) -> _Channels:
        """Elementwise op of tensors (residual add): all operands share one permutation."""
        var = operands[0].var
        for x in operands[1:]:
            var = self.vars.union(var, x.var)
        dims = {x.dim for x in operands if x.dim is not None}
        result = _Channels(var, next(iter(dims)) if dims else None)
        self._require(node, result, len(dims) <= 1, "operands carry channels on different dims")
        return result

    def _flatten(
        self, node: fx.Node, source: fx.Node, x: _Channels, start: object, end: object
    ) -> _Channels:
        rank = self._rank(source, x)
        if rank is not None and isinstance(start, int) and isinstance(end, int):
            start, end = start % rank, end % rank
            ends_last = end == rank - 1
        else:
            ends_last = end == -1
        if x.dim == 1 and start == 1 and ends_last:
            return _Channels(x.var, -1)  # channels become blocks of H*W on the last dim
        if x.dim == 1 and isinstance(start, int) and start >= 2:
            return x  # only spatial dims are merged
        if x.dim == -1 and rank == 2 and start == 1:
            return x  # flattening (N, F) is a no-op
        self._require(node, x, False, "flattening that moves channels is not supported")
        return _Channels(x.var, x.dim)

    def _reshape(self, node: fx.Node, source: fx.Node, x: _Channels) -> _Channels:
        """Accept ``view``/``reshape`` only as a no-op or as ``flatten(1)``."""
        in_shape, out_shape = self.shapes.get(source), self.shapes.get(node)
        if in_shape is not None and out_shape is not None:
            if in_shape == out_shape:
                return x
            flat = out_shape == (in_shape[0], math.prod(in_shape[1:]))
        else:
            shape = list(node.args[1:])
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = list(shape[0])
            # view(x.size(0), -1): the batch size is a traced value, the rest is flattened.
            flat = len(shape) == 2 and isinstance(shape[0], fx.Node) and shape[1] == -1
        if flat:
            return self._flatten(node, source, x, 1, -1)
        self._require(node, x, False, "reshape that is not flatten(1) may mix channels")
        return _Channels(x.var, x.dim)

    # --- modules -------------------------------------------------------------------------

    def _call_module(self, node: fx.Node, module: nn.Module) -> Value:
        name = str(node.target)
        inputs = self._tensor_inputs(node)
        source, x = inputs[0] if inputs else (node, _Channels(FIXED))
        if isinstance(module, nn.Linear):
            self._require(node, x, self._on_dim(source, x, -1), "input channels not on last dim")
            return self._weight_layer(name, module, x, dim=-1)
        if isinstance(module, _CONV_MODULES):
            if module.groups != 1:
                self._require(
                    node, x, False,
                    f"grouped/depthwise convolution (groups={module.groups}) mixes channels "
                    "only within groups, so its channels cannot be permuted freely",
                )  # fmt: skip
                return _Channels(FIXED, 1)
            self._require(node, x, x.dim == 1, "input channels not on dim 1")
            return self._weight_layer(name, module, x, dim=1)
        if isinstance(module, _BATCH_NORM_MODULES) or (
            isinstance(module, nn.GroupNorm) and module.num_groups == 1
        ):
            self._require(node, x, self._on_dim(source, x, 1), "input channels not on dim 1")
            return self._channel_norm(name, module, x)
        if isinstance(module, nn.GroupNorm):
            self._require(
                node, x, False,
                f"GroupNorm with {module.num_groups} groups normalises channels in groups; "
                "only GroupNorm with 1 group is permutation-equivariant",
            )  # fmt: skip
            return _Channels(FIXED)
        if isinstance(module, nn.LayerNorm):
            ok = len(module.normalized_shape) == 1 and self._on_dim(source, x, -1)
            self._require(node, x, ok, "LayerNorm must normalise only the last (channel) dim")
            return self._channel_norm(name, module, x)
        if isinstance(module, _ELEMENTWISE_MODULES):
            return x
        if isinstance(module, _POOL_MODULES):
            self._require(node, x, x.dim == 1, "pooling needs channels on dim 1 (N, C, ...)")
            return x
        if isinstance(module, nn.Flatten):
            return self._flatten(node, source, x, module.start_dim, module.end_dim)
        for _, operand in inputs:
            self._require(node, operand, False, "not known to be permutation-equivariant")
        return _Channels(FIXED)

    def _weight_layer(self, name: str, module: nn.Module, x: _Channels, dim: int) -> _Channels:
        """Linear or Conv: weight ``(out, in, ...)``, bias ``(out,)``; a fresh output variable."""
        if name not in self.module_outputs:
            self.module_outputs[name] = self.vars.new(name)
        out = self.module_outputs[name]
        self._bind(f"{name}.weight", 0, out)
        self._bind(f"{name}.weight", 1, x.var)
        if getattr(module, "bias", None) is not None:
            self._bind(f"{name}.bias", 0, out)
        return _Channels(out, dim)

    def _channel_norm(self, name: str, module: nn.Module, x: _Channels) -> _Channels:
        """Per-channel parameters and running statistics follow the channel permutation."""
        for key, tensor in module.state_dict(keep_vars=True).items():
            if tensor.dim() == 1:
                self._bind(f"{name}.{key}", 0, x.var)
        return x
