"""BatchNorm reset, federated BatchNorm statistics and REPAIR."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rebasin.merge import average
from rebasin.models import MLP
from rebasin.norm import (
    batchnorm_stats,
    channel_moments,
    combine_batchnorm_stats,
    has_batchnorm,
    layer_moments,
    load_batchnorm_stats,
    repair,
    reset_batchnorm_stats,
)


def _loader(n: int, seed: int, shift: float = 0.0, batch: int | None = None) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=gen) * 2 + shift
    return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=batch or n)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())


def test_reset_recomputes_running_statistics_from_data() -> None:
    net = _bn_net()
    loader = _loader(64, seed=1, shift=3.0)
    x = next(iter(loader))[0]
    reset_batchnorm_stats(net, loader)
    assert not net.training
    torch.testing.assert_close(net[0].running_mean, x.mean((0, 2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(net[0].running_var, x.var((0, 2, 3)), atol=1e-4, rtol=0)
    assert net[0].momentum == 0.1  # restored
    assert has_batchnorm(net) and not has_batchnorm(MLP(hidden=(4,)))
    with pytest.raises(ValueError, match="reset_batchnorm_stats got no data"):
        reset_batchnorm_stats(net, [])


def test_federated_statistics_pool_like_the_union_of_the_data() -> None:
    net = _bn_net()
    us, eu = _loader(40, seed=1, shift=-1.0), _loader(120, seed=2, shift=2.0)
    stats = [batchnorm_stats(net, us), batchnorm_stats(net, eu)]
    assert [s.count for s in stats] == [40, 120]
    pooled = combine_batchnorm_stats(stats)
    union = torch.cat([next(iter(us))[0], next(iter(eu))[0]])
    mean, var = pooled["0"]
    torch.testing.assert_close(mean, union.mean((0, 2, 3)), atol=1e-5, rtol=0)
    # Each client reports an unbiased variance; pooling is exact up to that n/(n-1) factor.
    torch.testing.assert_close(var, union.var((0, 2, 3)), atol=0, rtol=2e-2)
    assert set(pooled) == {"0", "2"}
    before = net[0].running_mean.clone()
    load_batchnorm_stats(net, pooled)
    assert torch.equal(net[0].running_mean, mean) and not torch.equal(before, mean)
    with pytest.raises(ValueError, match="'1' is not a BatchNorm layer of the model"):
        load_batchnorm_stats(net, {"1": pooled["0"]})
    with pytest.raises(ValueError, match="no BatchNorm statistics to combine"):
        combine_batchnorm_stats([])


def test_repair_gives_every_hidden_unit_the_interpolated_statistics() -> None:
    torch.manual_seed(0)
    endpoints = [MLP(in_features=48, hidden=(16, 8), num_classes=3).eval() for _ in range(2)]
    merged = MLP(in_features=48, hidden=(16, 8), num_classes=3).eval()
    merged.load_state_dict(average([m.state_dict() for m in endpoints], weights=[1.0, 3.0]))
    loader = _loader(256, seed=3, batch=64)
    repair(merged, endpoints, loader, weights=[1.0, 3.0])
    for layer in ("layers.0", "layers.1"):
        target = [channel_moments(m, layer, loader, None) for m in endpoints]
        got_mean, got_std = channel_moments(merged, layer, loader, None)
        torch.testing.assert_close(
            got_mean, 0.25 * target[0][0] + 0.75 * target[1][0], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            got_std, 0.25 * target[0][1] + 0.75 * target[1][1], atol=1e-4, rtol=1e-4
        )
    with pytest.raises(ValueError, match="repair needs at least one endpoint model"):
        repair(merged, [], loader)


def test_repair_corrects_layernorm_models_through_the_norms_affine_parameters() -> None:
    # LayerNorm (GroupNorm(1, C)) models have bias-free convolutions: REPAIR must act on the
    # norms, or it would change nothing.
    from rebasin.models import VGG

    def net() -> nn.Module:
        return VGG(cfg=(8, "M", 8, 8, "M"), norm="layer", image_size=8).eval()

    torch.manual_seed(0)
    endpoints = [net() for _ in range(2)]
    for m in endpoints:  # non-trivial affine parameters, as after training
        for gn in (x for x in m.modules() if isinstance(x, nn.GroupNorm)):
            nn.init.uniform_(gn.weight, 0.5, 1.5)
            nn.init.normal_(gn.bias, 0.0, 0.3)
    merged = net()
    merged.load_state_dict(average([m.state_dict() for m in endpoints]))
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    images = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(images, torch.zeros(64, dtype=torch.long)), batch_size=32)
    repair(merged, endpoints, loader)
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])}
    norms = ["norms.0", "norms.1", "norms.2"]
    assert changed == {f"{n}.{p}" for n in norms for p in ("weight", "bias")}
    for layer in norms:
        target = [channel_moments(m, layer, loader, None) for m in endpoints]
        got_mean, got_std = channel_moments(merged, layer, loader, None)
        torch.testing.assert_close(got_mean, 0.5 * (target[0][0] + target[1][0]), atol=1e-4, rtol=0)
        torch.testing.assert_close(
            got_std, 0.5 * (target[0][1] + target[1][1]), atol=1e-4, rtol=1e-3
        )


def _textbook_repair(merged, endpoints, loader, weights, eps=1e-5):
    """REPAIR measured one layer at a time, the endpoints too (the plain form of the loop)."""
    total = float(sum(weights))
    names = [n for n, m in merged.named_modules() if isinstance(m, nn.Linear)][:-1]
    for name in names:
        targets = [channel_moments(m, name, loader, None) for m in endpoints]
        mu_t = sum(w * t[0] for w, t in zip(weights, targets)) / total
        std_t = sum(w * t[1] for w, t in zip(weights, targets)) / total
        mu_m, std_m = channel_moments(merged, name, loader, None)
        scale = std_t / (std_m + eps)
        layer = dict(merged.named_modules())[name]
        layer.weight.mul_(scale.view(-1, 1).to(layer.weight.dtype))
        layer.bias.copy_(((layer.bias.double() - mu_m) * scale + mu_t).to(layer.bias.dtype))
    return merged


@torch.no_grad()
def test_repair_measures_each_endpoint_once_and_equals_the_layer_by_layer_form() -> None:
    torch.manual_seed(0)
    endpoints = [MLP(in_features=48, hidden=(16, 8, 8), num_classes=3).eval() for _ in range(2)]
    state = average([m.state_dict() for m in endpoints], weights=[1.0, 3.0])
    fast, slow = (MLP(in_features=48, hidden=(16, 8, 8), num_classes=3).eval() for _ in range(2))
    fast.load_state_dict(state)
    slow.load_state_dict(state)
    loader = _loader(256, seed=3, batch=64)
    passes = [0, 0]
    hooks = [
        m.register_forward_pre_hook(lambda *_, i=i: passes.__setitem__(i, passes[i] + 1))
        for i, m in enumerate(endpoints)
    ]
    repair(fast, endpoints, loader, weights=[1.0, 3.0])
    assert passes == [4, 4]  # one pass over the 4 batches per endpoint, not one per layer
    for h in hooks:
        h.remove()
    _textbook_repair(slow, endpoints, loader, weights=[1.0, 3.0])
    for key, value in slow.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value), key
    together = layer_moments(endpoints[0], ["layers.0", "layers.2"], loader, None)
    for name in ("layers.0", "layers.2"):
        alone = channel_moments(endpoints[0], name, loader, None)
        assert torch.equal(together[name][0], alone[0]) and torch.equal(together[name][1], alone[1])
    hooked = len(endpoints[0].layers[0]._forward_hooks)
    with pytest.raises(ValueError, match=r"the model has no layer\(s\) 'layers.9'"):
        layer_moments(endpoints[0], ["layers.0", "layers.9"], loader, None)
    assert len(endpoints[0].layers[0]._forward_hooks) == hooked  # no hook left behind
    with pytest.raises(ValueError, match="layer 'layers.0' gave no output over the data"):
        layer_moments(endpoints[0], ["layers.0"], [], None)
