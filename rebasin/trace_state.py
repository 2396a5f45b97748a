"""The tracer's state: values, channel variables and their layouts (see :mod:`rebasin.trace`).

Channel variables live in a union-find whose class ``FIXED`` is never permuted. Each state-dict
axis is bound to a *layout*: a variable, a concatenation ``("concat", ((layout, length), ..))``
or a grid ``("grid", (variables, ..), (sizes, ..))``; at the end every layout becomes the
matching :class:`~rebasin.spec.Concat` / :class:`~rebasin.spec.Grid` entry of the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from rebasin.spec import Concat, Grid, PermutationSpec, SpecError

FIXED = 0  # union-find class of "never permuted": model inputs, outputs, pinned parameters


class UnsupportedModelError(SpecError):
    """The model contains an op that cannot be shown to be permutation-equivariant."""


@dataclass(frozen=True)
class Channels:
    """A traced tensor: its channel variable and the dim its channels sit on.

    ``dim`` is 1 for ``(N, C, ...)`` maps, -1 for ``(..., F)`` features when the rank is not
    known (otherwise the dim's index), and ``None`` for values fixed from the start (their
    layout does not matter). ``blocks``: channels joined by ``torch.cat``, one
    ``(variable, entries)`` per block; ``var`` is then unused.
    """

    var: int
    dim: int | None = None
    blocks: tuple[tuple[int, int], ...] | None = None
    inner: int | None = None  # channels split into heads: ``dim`` holds heads, this head dims


@dataclass(frozen=True)
class Param:
    """A parameter or buffer used directly in the forward (class token, layer scale)."""

    key: str
    ndim: int


@dataclass(frozen=True)
class TupleValue:
    """A module returning a tuple (``nn.MultiheadAttention``: output, weights)."""

    items: tuple[Channels, ...]


# Values of traced nodes; None for Python values (sizes, ints).
Value = Channels | Param | TupleValue | None
Layout = int | tuple


class _ChannelVariables:
    """Union-find over channel variables; the class of ``FIXED`` is never permuted.

    A variable may be *split* into attention heads: ``(heads, head_dims)`` sub-variables with
    sizes ``(H, D)`` (a ``view`` of the channels into heads), or into the groups of a grouped
    convolution; it then stands for the grid ``Grid((heads, head_dims), (H, D))`` and unifying
    two split variables unifies their parts.
    """

    def __init__(self) -> None:
        self.parent: list[int] = [FIXED]
        self.origin: list[str] = ["<fixed>"]  # the layer that created each variable
        self.splits: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}  # root -> parts

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
        if root_a == root_b:
            return root_a
        root = min(root_a, root_b)
        self.parent[max(root_a, root_b)] = root
        parts = [p for p in (self.splits.pop(root_a, None), self.splits.pop(root_b, None)) if p]
        if root == FIXED:
            for (h, d), _ in parts:
                self.union(h, FIXED)
                self.union(d, FIXED)
        elif len(parts) == 2 and parts[0][1] == parts[1][1]:
            self.splits[root] = parts[0]
            for x, y in zip(parts[0][0], parts[1][0]):
                self.union(x, y)
        elif len(parts) == 2:  # split into heads differently: no common permutation but none
            for (h, d), _ in parts:
                self.union(h, FIXED)
                self.union(d, FIXED)
            self.splits[root] = parts[0]
        elif parts:
            self.splits[root] = parts[0]
        return self.find(root)

    def split(
        self, var: int, sizes: tuple[int, int], labels: tuple[str, str] = ("heads", "head_dims")
    ) -> tuple[int, int] | None:
        """The (outer, inner) parts of ``var``, made on first use and named ``labels`` (heads,
        or the groups of a grouped convolution); ``None`` if it was split otherwise."""
        root = self.find(var)
        if root == FIXED:
            return FIXED, FIXED
        if root not in self.splits:
            name = self.origin[root]
            parts = (self.new(f"{name}.{labels[0]}"), self.new(f"{name}.{labels[1]}"))
            self.splits[root] = (parts, sizes)
        parts, known = self.splits[root]
        return parts if known == sizes else None

    def parts(self, var: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
        return self.splits.get(self.find(var))

    def is_fixed(self, var: int) -> bool:
        root = self.find(var)
        if root == FIXED:
            return True
        parts = self.splits.get(root)
        return parts is not None and all(self.is_fixed(p) for p in parts[0])


class TraceState:
    """State of one trace and the helpers on values."""

    def __init__(self, model: nn.Module, shapes: dict[fx.Node, tuple[int, ...]]) -> None:
        self.model = model
        self.shapes = shapes  # empty without an example input
        self.vars = _ChannelVariables()
        self.values: dict[fx.Node, Value] = {}
        self.layouts: dict[tuple[str, int], Layout] = {}
        self.module_vars: dict[str, int] = {}  # a module called twice keeps its variables
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
                key: tuple(
                    self._entry(self.layouts.get((self.canonical[key], axis), FIXED))
                    for axis in range(t.dim())
                )
                for key, t in self.state.items()
            }
        )

    def _name(self, var: int) -> str | None:
        if self.vars.is_fixed(var):
            return None
        return f"P_{self.vars.origin[self.vars.find(var)]}"

    def _entry(self, layout: Layout) -> str | Grid | Concat | None:
        if isinstance(layout, int):
            parts = self.vars.parts(layout)
            if parts is not None:
                layout = ("grid", parts[0], parts[1])
            else:
                return self._name(layout)
        if layout[0] == "grid":
            perms = tuple(self._name(v) for v in layout[1])
            return None if all(p is None for p in perms) else Grid(perms, layout[2])
        blocks = tuple((self._entry(sub), n) for sub, n in layout[1])
        if all(entry is None for entry, _ in blocks):
            return None
        if len(blocks) == 1 and not isinstance(blocks[0][0], Grid):
            return blocks[0][0]
        return Concat(blocks)

    # --- bookkeeping ---------------------------------------------------------------------

    def module_var(self, label: str) -> int:
        if label not in self.module_vars:
            self.module_vars[label] = self.vars.new(label)
        return self.module_vars[label]

    def bind(self, key: str, axis: int, layout: Layout) -> None:
        """Record that ``layout`` acts on ``axis`` of state-dict entry ``key``."""
        if key not in self.canonical:  # a non-persistent buffer
            return
        key = self.canonical[key]
        old = self.layouts.get((key, axis))
        self.layouts[(key, axis)] = layout if old is None else self._merge(old, layout)

    def bind_value(self, key: str, axis: int, x: Channels) -> None:
        self.bind(key, axis, x.var if x.blocks is None else ("concat", x.blocks))

    def _merge(self, a: Layout, b: Layout) -> Layout:
        """Two layouts on one axis (a reused module): unify them part by part; if their
        structures differ, pin both (the identity is always a valid permutation)."""
        if isinstance(a, int) and isinstance(b, int):
            return self.vars.union(a, b)
        if not isinstance(a, int) and not isinstance(b, int) and a[0] == b[0]:
            if a[0] == "grid" and a[2] == b[2]:
                return ("grid", tuple(self.vars.union(x, y) for x, y in zip(a[1], b[1])), a[2])
            if a[0] == "concat" and [n for _, n in a[1]] == [n for _, n in b[1]]:
                return (
                    "concat",
                    tuple((self._merge(x, y), n) for (x, n), (y, _) in zip(a[1], b[1])),
                )
        for var in self._layout_vars(a) + self._layout_vars(b):
            self.vars.union(var, FIXED)
        return FIXED

    def _layout_vars(self, layout: Layout) -> list[int]:
        if isinstance(layout, int):
            return [layout]
        if layout[0] == "grid":
            return list(layout[1])
        return [v for sub, _ in layout[1] for v in self._layout_vars(sub)]

    @staticmethod
    def _vars(x: Channels) -> list[int]:
        return [x.var] if x.blocks is None else [v for v, _ in x.blocks]

    def require(self, node: fx.Node, x: Channels, ok: bool, why: str) -> None:
        """Unless ``ok``, the op is only valid if ``x`` ends up fixed (checked at the end)."""
        if not ok:
            for var in self._vars(x):
                self.checks.append((var, f"{self.describe(node)}: {why}"))

    def unify(self, node: fx.Node, a: Channels, b: Channels) -> Channels:
        """Two operands of an elementwise op: the same permutation (block by block)."""
        if a.blocks is None and b.blocks is None:
            return Channels(self.vars.union(a.var, b.var), a.dim)
        if a.blocks is not None and b.blocks is not None:
            if [n for _, n in a.blocks] == [n for _, n in b.blocks]:
                blocks = tuple(
                    (self.vars.union(x, y), n) for (x, n), (y, _) in zip(a.blocks, b.blocks)
                )
                return Channels(FIXED, a.dim, blocks)
        why = "combines concatenated channels with differently made channels"
        self.require(node, a, False, why)
        self.require(node, b, False, why)
        return a

    def fix_param(self, param: Param) -> None:
        """A parameter used where it cannot follow a permutation: pin all its axes."""
        for axis in range(param.ndim):
            self.bind(param.key, axis, FIXED)

    def bind_param(self, node: fx.Node, param: Param, x: Channels) -> None:
        """A parameter broadcast against ``x`` (the op's result): its axis aligned with the
        channels carries their permutation; its other axes none."""
        end = self.from_end(node, x)
        if end is None:  # ranks unknown: pin the channels instead
            for var in self._vars(x):
                self.vars.union(var, FIXED)
            self.fix_param(param)
            return
        axis = param.ndim + end
        for other in range(param.ndim):
            if other != axis:
                self.bind(param.key, other, FIXED)
        if axis >= 0 and self.state[param.key].shape[axis] > 1:
            self.bind_value(param.key, axis, x)

    def describe(self, node: fx.Node) -> str:
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

    # --- dims ----------------------------------------------------------------------------

    def rank(self, node: fx.Node, x: Channels) -> int | None:
        """Rank of a node's tensor; without shapes, features are taken to be ``(N, F)``."""
        shape = self.shapes.get(node)
        if shape is not None:
            return len(shape)
        return 2 if x.dim == -1 else None

    def dim_index(self, node: fx.Node, x: Channels, rank: int | None = None) -> int | None:
        """The non-negative index of the channel dim, where it can be known."""
        if x.dim is None:
            return None
        rank = rank if rank is not None else self.rank(node, x)
        if rank is not None:
            return x.dim % rank
        return x.dim if x.dim >= 0 else None

    def from_end(self, node: fx.Node, x: Channels) -> int | None:
        """The channel dim counted from the end (-1: last), which broadcasting keeps."""
        dim, rank = self.dim_index(node, x), self.rank(node, x)
        if dim is not None and rank is not None:
            return dim - rank
        return -1 if x.dim == -1 else None

    def on_dim(self, node: fx.Node, x: Channels, dim: int) -> bool:
        """Whether ``x``'s channels sit on ``dim`` (1 and -1 coincide for ``(N, C)``)."""
        if x.dim is None:
            return False
        rank = self.rank(node, x)
        if rank is not None:
            return x.dim % rank == dim % rank or rank == 2
        return x.dim == dim

    def last(self, node: fx.Node) -> int:
        shape = self.shapes.get(node)
        return -1 if shape is None else len(shape) - 1

    def tensor_inputs(self, node: fx.Node) -> list[tuple[fx.Node, Channels | Param]]:
        return [
            (n, v)
            for n in node.all_input_nodes
            if isinstance(v := self.values[n], (Channels, Param))
        ]

    _tensor_inputs = tensor_inputs
