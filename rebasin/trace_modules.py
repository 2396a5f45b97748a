"""The tracer's rules for modules (see :mod:`rebasin.trace`): Linear, convolutions
(depthwise too), norms, ``nn.MultiheadAttention``, ``nn.TransformerEncoder(Layer)``,
``nn.Embedding``, elementwise and pooling modules."""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from rebasin.trace_state import FIXED, Channels, Param, TraceState, TupleValue, Value

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Mish, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.AlphaDropout, nn.Identity,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = (F.relu, F.gelu, F.silu, F.elu, F.leaky_relu, F.tanh, F.sigmoid)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _is_stochastic_depth(module: nn.Module) -> bool:
    """torchvision's StochasticDepth: drops whole samples or rows, so it is elementwise (and
    its training branch cannot be traced, hence a leaf). Checked by name: the engine does not
    import torchvision."""
    cls = type(module)
    return cls.__name__ == "StochasticDepth" and cls.__module__.startswith("torchvision.")


def is_known_leaf(module: nn.Module) -> bool:
    """Modules the tracer keeps as one call because it has a rule for them."""
    return _is_stochastic_depth(module) or isinstance(
        module, (nn.MultiheadAttention, nn.TransformerEncoder, nn.TransformerEncoderLayer)
    )


class ModuleRules(TraceState):
    """The rules for modules (``_flatten`` is in rebasin.trace_ops)."""

    # --- modules -------------------------------------------------------------------------

    def call_module(self, node: fx.Node, module: nn.Module) -> Value:
        name = str(node.target)
        inputs = self.tensor_inputs(node)
        source, x = inputs[0] if inputs else (node, Channels(FIXED))
        if isinstance(x, Param):
            self.fix_param(x)
            x = Channels(FIXED)
        split = [v for _, v in inputs if isinstance(v, Channels) and v.inner is not None]
        if split and not isinstance(module, _ELEMENTWISE_MODULES):
            for v in split:
                self.require(node, v, False, "module on channels split into heads")
            return Channels(FIXED)
        if isinstance(module, nn.MultiheadAttention):
            return self._attention_call(node, name, module)
        if isinstance(module, (nn.TransformerEncoder, nn.TransformerEncoderLayer)):
            return self._encoder(node, source, name, module, x)
        if isinstance(module, nn.Embedding):
            self.require(node, x, x.dim is None, "Embedding indices must not be permuted")
            out = self.module_var(name)
            self.bind(f"{name}.weight", 1, out)
            return Channels(out, self.last(node))
        if isinstance(module, nn.Linear):
            self.require(node, x, self.on_dim(source, x, -1), "input channels not on last dim")
            return self._weight_layer(name, module, x, self.last(node))
        if isinstance(module, _CONV_MODULES):
            return self._conv(node, source, name, module, x)
        if isinstance(module, _BATCH_NORM_MODULES) or (
            isinstance(module, nn.GroupNorm) and module.num_groups == 1
        ):
            self.require(node, x, self.on_dim(source, x, 1), "input channels not on dim 1")
            return self._channel_norm(name, module, x)
        if isinstance(module, nn.GroupNorm):
            self.require(
                node, x, False,
                f"GroupNorm with {module.num_groups} groups normalises channels in groups; "
                "only GroupNorm with 1 group is permutation-equivariant",
            )  # fmt: skip
            return Channels(FIXED)
        if isinstance(module, nn.LayerNorm):
            ok = len(module.normalized_shape) == 1 and self.on_dim(source, x, -1)
            self.require(node, x, ok, "LayerNorm must normalise only the last (channel) dim")
            return self._channel_norm(name, module, x)
        if isinstance(module, _ELEMENTWISE_MODULES) or _is_stochastic_depth(module):
            return x
        if isinstance(module, _POOL_MODULES):
            self.require(node, x, self.on_dim(source, x, 1), "pooling needs channels on dim 1")
            return x
        if isinstance(module, nn.Flatten):
            return self._flatten(node, source, x, module.start_dim, module.end_dim)
        for _, operand in inputs:
            if isinstance(operand, Channels):
                self.require(node, operand, False, "not known to be permutation-equivariant")
            else:
                self.fix_param(operand)
        return Channels(FIXED)

    def _weight_layer(self, name: str, module: nn.Module, x: Channels, dim: int) -> Channels:
        """Linear or Conv: weight ``(out, in, ...)``, bias ``(out,)``; a fresh output variable."""
        out = self.module_var(name)
        self.bind(f"{name}.weight", 0, out)
        self.bind_value(f"{name}.weight", 1, x)
        if getattr(module, "bias", None) is not None:
            self.bind(f"{name}.bias", 0, out)
        return Channels(out, dim)

    def _conv(
        self, node: fx.Node, source: fx.Node, name: str, module: nn.Module, x: Channels
    ) -> Channels:
        self.require(node, x, x.dim is None or self.on_dim(source, x, 1), "channels not on dim 1")
        if module.groups == 1:
            return self._weight_layer(name, module, x, 1)
        if module.groups == module.in_channels:
            # Depthwise: output channel c * m + j is made from input channel c only, so the
            # input's permutation acts on the output too (in blocks of m).
            m = module.out_channels // module.in_channels
            out = (
                x
                if x.blocks is None
                else Channels(x.var, 1, tuple((v, n * m) for v, n in x.blocks))
            )
            self.bind_value(f"{name}.weight", 0, out)
            if module.bias is not None:
                self.bind_value(f"{name}.bias", 0, out)
            return Channels(out.var, 1, out.blocks)
        return self._grouped_conv(node, name, module, x)

    def _grouped_conv(self, node: fx.Node, name: str, module: nn.Module, x: Channels) -> Channels:
        """``groups = g``: output channel ``q * t + r`` (group ``q``) sees input channels
        ``q * s + j`` only, so the permutations that keep groups intact are ``G x W_in`` on the
        input and ``G x W_out`` on the output (``G`` moves whole groups, ``W`` the channels
        inside every group alike): the weight ``(C_out, s, k, k)`` gets ``Grid(G, W_out)`` and
        ``W_in``. The input's variable is split into groups (a ``Grid`` wherever it acts)."""
        g = module.groups
        s, t = module.in_channels // g, module.out_channels // g
        labels = ("groups", "in_group")
        parts = (FIXED, FIXED) if x.dim is None else self.vars.split(x.var, (g, s), labels)
        if parts is None or x.blocks is not None:
            self.require(
                node, x, False,
                f"grouped convolution (groups={g}, {module.in_channels} -> "
                f"{module.out_channels} channels): its input channels are already split into "
                "other groups (or concatenated), so no permutation keeps both intact",
            )  # fmt: skip
            return Channels(FIXED, 1)
        out = self.module_var(name)
        out_parts = self.vars.split(out, (g, t), labels)
        self.vars.union(out_parts[0], parts[0])
        self.bind(f"{name}.weight", 0, out)
        self.bind(f"{name}.weight", 1, parts[1])
        if module.bias is not None:
            self.bind(f"{name}.bias", 0, out)
        return Channels(out, 1)

    def _channel_norm(self, name: str, module: nn.Module, x: Channels) -> Channels:
        """Per-channel parameters and running statistics follow the channel permutation."""
        for key, tensor in module.state_dict(keep_vars=True).items():
            if tensor.dim() == 1:
                self.bind_value(f"{name}.{key}", 0, x)
        return x

    def _attention_call(self, node: fx.Node, name: str, module: nn.MultiheadAttention) -> Value:
        args = [node.args[i] if len(node.args) > i else node.kwargs.get(k) for i, k in
                enumerate(("query", "key", "value"))]  # fmt: skip
        operands = []
        for arg in args:
            value = self.values.get(arg) if isinstance(arg, fx.Node) else None
            if isinstance(value, Param):
                self.fix_param(value)
                value = Channels(FIXED)
            x = value if isinstance(value, Channels) else Channels(FIXED)
            self.require(node, x, x.dim is None or self.on_dim(arg, x, -1), "input not on last dim")
            operands.append(x)
        out = self.attention(name, module, *operands)
        dim = self.dim_index(args[0], operands[0]) if operands[0].dim is not None else -1
        return TupleValue((Channels(out, dim), Channels(FIXED)))

    def attention(
        self, name: str, module: nn.MultiheadAttention, q: Channels, k: Channels, v: Channels
    ) -> int:
        """Bind an ``nn.MultiheadAttention``'s parameters; return its output variable.

        Heads move together in q, k, v and ``out_proj``'s input (variable ``.heads``); inside
        every head, query/key dims share ``.qk`` and value/output dims ``.vo``.
        """
        e, h, d = module.embed_dim, module.num_heads, module.head_dim
        heads = self.module_var(f"{name}.heads")
        qk = ("grid", (heads, self.module_var(f"{name}.qk")), (h, d))
        vo = ("grid", (heads, self.module_var(f"{name}.vo")), (h, d))
        packed = ("concat", ((qk, e), (qk, e), (vo, e)))
        if module._qkv_same_embed_dim:
            joined = self.unify_all([q, k, v])
            self.bind(f"{name}.in_proj_weight", 0, packed)
            self.bind_value(f"{name}.in_proj_weight", 1, joined)
        else:
            for proj, x, rows in (("q", q, qk), ("k", k, qk), ("v", v, vo)):
                self.bind(f"{name}.{proj}_proj_weight", 0, rows)
                self.bind_value(f"{name}.{proj}_proj_weight", 1, x)
        if module.in_proj_bias is not None:
            self.bind(f"{name}.in_proj_bias", 0, packed)
        for bias, rows in (("bias_k", qk), ("bias_v", vo)):
            if getattr(module, bias) is not None:  # shape (1, 1, E)
                self.bind(f"{name}.{bias}", 0, FIXED)
                self.bind(f"{name}.{bias}", 1, FIXED)
                self.bind(f"{name}.{bias}", 2, rows)
        out = self.module_var(f"{name}.out_proj")
        self.bind(f"{name}.out_proj.weight", 0, out)
        self.bind(f"{name}.out_proj.weight", 1, vo)
        if module.out_proj.bias is not None:
            self.bind(f"{name}.out_proj.bias", 0, out)
        return out

    def unify_all(self, xs: list[Channels]) -> Channels:
        moving = [x for x in xs if x.dim is not None]
        if not moving:
            return Channels(FIXED)
        result = moving[0]
        for x in moving[1:]:
            result = Channels(self.vars.union(result.var, x.var), result.dim)
        for x in xs:
            if x.dim is None:
                result = Channels(self.vars.union(result.var, FIXED), result.dim)
        return result

    def _encoder(
        self, node: fx.Node, source: fx.Node, name: str, module: nn.Module, x: Channels
    ) -> Channels:
        """``nn.TransformerEncoder(Layer)``: one residual-stream permutation through all
        layers; attention as in :meth:`attention`; a fresh permutation per feed-forward."""
        self.require(node, x, x.dim is None or self.on_dim(source, x, -1), "input not last dim")
        self.require(node, x, x.blocks is None, "a concatenation as the residual stream")
        stream = x if x.dim is not None else Channels(self.module_var(name), -1)
        if x.dim is None:
            self.vars.union(stream.var, FIXED)
        if isinstance(module, nn.TransformerEncoder):
            layers = [(f"{name}.layers.{i}", layer) for i, layer in enumerate(module.layers)]
            final_norm = module.norm
        else:
            layers, final_norm = [(name, module)], None
        var = stream.var
        for prefix, layer in layers:
            activation = layer.activation
            ok = activation in _ELEMENTWISE_FUNCTIONS or isinstance(
                activation, _ELEMENTWISE_MODULES
            )
            self.require(node, stream, ok, f"activation {activation!r} of {prefix!r} unknown")
            attn_in = Channels(var, -1)
            var = self.vars.union(var, self.attention(f"{prefix}.self_attn", layer.self_attn,
                                                      attn_in, attn_in, attn_in))  # fmt: skip
            hidden = self.module_var(f"{prefix}.linear1")
            self.bind(f"{prefix}.linear1.weight", 0, hidden)
            self.bind(f"{prefix}.linear1.weight", 1, var)
            self.bind(f"{prefix}.linear1.bias", 0, hidden)
            self.bind(f"{prefix}.linear2.weight", 0, var)
            self.bind(f"{prefix}.linear2.weight", 1, hidden)
            self.bind(f"{prefix}.linear2.bias", 0, var)
            for norm_name in ("norm1", "norm2"):
                self.bind(f"{prefix}.{norm_name}.weight", 0, var)
                self.bind(f"{prefix}.{norm_name}.bias", 0, var)
        if final_norm is not None:
            self._channel_norm(f"{name}.norm", final_norm, Channels(var, -1))
        return Channels(var, stream.dim)
