"""The tracer's rules for tensor ops (see :mod:`rebasin.trace`): elementwise combination,
flatten/reshape/permute/transpose, reductions, indexing, ``torch.cat``, ``F.layer_norm``,
heads for ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import math

from torch import fx

from rebasin.trace_modules import ModuleRules
from rebasin.trace_state import FIXED, Channels, Param, Value

RESHAPE_REMEDY = (
    "pass example_input= (a batch the model accepts) so that the tracer can check shapes, or "
    "give an explicit spec="
)


def arg(node: fx.Node, index: int, name: str, default: object) -> object:
    """Positional-or-keyword argument ``name`` of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def dims_arg(node: fx.Node, first: int) -> list[object]:
    """``x.permute(0, 2, 1)`` and ``x.permute((0, 2, 1))`` alike."""
    dims = list(node.args[first:]) or list(node.kwargs.get("dims", ()))
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = list(dims[0])
    return dims


class TensorOps(ModuleRules):
    """The rules for tensor ops."""

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
            if rank is not None and end < dim:  # dims before the channels merged (B*L, F)
                return Channels(x.var, dim - (end - start), x.blocks)
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
            shape = dims_arg(node, 1)
            # view(x.size(0), -1): the batch size is a traced value, the rest is flattened.
            if len(shape) == 2 and isinstance(shape[0], fx.Node) and shape[1] == -1:
                return self._flatten(node, source, x, 1, -1)
            self.require(
                node,
                x,
                False,
                f"reshape that is not flatten(1) may mix channels; {RESHAPE_REMEDY}",
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
        while k < len(out_shape) - 1 and out_shape[k] == 1:
            k += 1  # size-1 dims (a batch of 1, an unsqueeze) come before the channels
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
            self.require(node, x, False, f"permute of channels needs known dims; {RESHAPE_REMEDY}")
            return Channels(x.var, x.dim, x.blocks)
        order = [d % rank for d in dims]
        inner = None if x.inner is None else order.index(x.inner)
        return Channels(x.var, order.index(dim), x.blocks, inner)

    def _transpose(self, node: fx.Node, source: fx.Node, x: Channels) -> Channels:
        a, b = arg(node, 1, "dim0", None), arg(node, 2, "dim1", None)
        rank = self.rank(source, x)
        dim = self.dim_index(source, x)
        if rank is None or dim is None or not (isinstance(a, int) and isinstance(b, int)):
            self.require(
                node, x, False, f"transpose of channels needs known ranks; {RESHAPE_REMEDY}"
            )
            return Channels(x.var, x.dim, x.blocks)
        a, b = a % rank, b % rank

        def moved(d: int | None) -> int | None:
            return b if d == a else a if d == b else d

        return Channels(x.var, moved(dim), x.blocks, moved(x.inner))

    def _reduce(self, node: fx.Node, source: fx.Node, x: Channels) -> Channels:
        """``mean``/``sum`` over dims other than the channels'."""
        dims = arg(node, 1, "dim", None)
        keepdim = bool(arg(node, 2, "keepdim", False))
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
                node, x, False, f"indexing of channels needs known ranks; {RESHAPE_REMEDY}"
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
        tensors = arg(node, 0, "tensors", ())
        dim = arg(node, 1, "dim", 0)
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
                    node, x, False, f"concatenation of permuted channels; {RESHAPE_REMEDY}"
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
        shape = arg(node, 1, "normalized_shape", ())
        params = [arg(node, i, name, None) for i, name in ((2, "weight"), (3, "bias"))]
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
        while k < len(out_shape) - 1 and out_shape[k] == 1:
            k += 1  # size-1 dims (a batch of 1, an unsqueeze) come before the channels
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
