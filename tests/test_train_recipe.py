"""The CIFAR training options: augmentation, label smoothing, schedules, precision, layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rebasin.augment import RandomCropFlip, crop_flip
from rebasin.models import MLP, VGG
from rebasin.recipe import (
    TrainRecipe,
    bf16_supported,
    cpu_flags,
    make_scheduler,
    resolve,
    training_identity,
)
from rebasin.train import train


def _legacy_train(model, loader, epochs, lr, optimizer="sgd", weight_decay=0.0):
    """The training loop as it was before the recipe (the oracle of the default path)."""
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if optimizer == "sgd" else None
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    last = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item() * len(y)
            count += len(y)
        last = total / max(count, 1)
    model.eval()
    return last


def _mnist_like(n: int = 96, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def _cifar_like(n: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_default_recipe_trains_bit_for_bit_like_the_old_loop(optimizer):
    batches = _mnist_like()
    lr = 0.05 if optimizer == "sgd" else 1e-3
    torch.manual_seed(3)
    old, new = MLP(width=0.1), MLP(width=0.1)
    new.load_state_dict(old.state_dict())
    old_loss = _legacy_train(old, batches, 2, lr, optimizer, weight_decay=5e-4)
    new_loss = train(new, batches, 2, lr, optimizer, weight_decay=5e-4)
    assert new_loss == old_loss  # exactly
    for key, value in old.state_dict().items():
        assert torch.equal(new.state_dict()[key], value), key
    # MNIST's dataset defaults are the original loop.
    assert TrainRecipe.for_dataset("mnist", "mlp") == TrainRecipe()


def test_cifar_defaults_turn_on_augmentation_layout_and_auto_bf16():
    assert TrainRecipe.for_dataset("cifar10", "vgg") == TrainRecipe(
        augment=True, channels_last=True, bf16="auto"
    )
    assert TrainRecipe.for_dataset("cifar10", "mlp").channels_last is False
    overridden = TrainRecipe.for_dataset("cifar10", "vgg", augment=False, bf16=None)
    assert overridden.augment is False and overridden.bf16 == "auto"


# --------------------------------------------------------------------------------------------
# augmentation


def test_crop_flip_centre_offset_is_identity_and_flip_is_an_exact_mirror():
    x = torch.randn(5, 3, 8, 8)
    centre = torch.full((5, 2), 4)
    assert torch.equal(crop_flip(x, centre, torch.zeros(5, dtype=torch.bool), 4), x)
    flips = torch.tensor([True, False, True, False, True])
    out = crop_flip(x, centre, flips, 4)
    assert torch.equal(out[flips], x[flips].flip(3))
    assert torch.equal(out[~flips], x[~flips])


def test_crop_with_padding_shifts_content_exactly_and_fills_zeros():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    offsets = torch.tensor([[0, 8], [6, 1]])  # image 0: 4 up, 4 right; image 1: 2 down, 3 left
    out = crop_flip(x, offsets, torch.zeros(2, dtype=torch.bool), 4)
    for n, (oy, ox) in enumerate(offsets.tolist()):
        dy, dx = oy - 4, ox - 4
        for i in range(6):
            for j in range(6):
                si, sj = i + dy, j + dx
                want = x[n, :, si, sj] if 0 <= si < 6 and 0 <= sj < 6 else torch.zeros(3)
                assert torch.equal(out[n, :, i, j], want), (n, i, j)


def test_augmentation_keeps_shape_dtype_and_is_seeded():
    x = torch.randn(64, 3, 32, 32)
    a, b, c = RandomCropFlip(7), RandomCropFlip(7), RandomCropFlip(8)
    out_a, out_b, out_c = a(x), b(x), c(x)
    assert out_a.shape == x.shape and out_a.dtype == x.dtype
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, out_c)
    # The next batch draws new offsets from the same generator.
    assert not torch.equal(a(x), out_a)
    # Every output pixel is an input pixel of the same image and channel, or padding.
    values = set(x[0, 0].flatten().tolist()) | {0.0}
    assert set(out_a[0, 0].flatten().tolist()) <= values


def test_crop_flip_rejects_bad_offsets():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, 2\]"):
        crop_flip(x, torch.tensor([[0, 3], [0, 0]]), torch.zeros(2, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="offsets of shape"):
        crop_flip(x, torch.zeros(3, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.bool), 1)


# --------------------------------------------------------------------------------------------
# loss and schedule


def test_label_smoothing_changes_the_loss_by_the_known_formula():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 10), torch.randint(0, 10, (16,))
    eps = 0.1
    logp = torch.log_softmax(logits, 1)
    want = (1 - eps) * nn.functional.nll_loss(logp, labels) + eps * (-logp.mean(1)).mean()
    got = nn.CrossEntropyLoss(label_smoothing=eps)(logits, labels)
    assert torch.allclose(got, want, atol=1e-6)
    # ... and train() uses it: one constant-rate step with lr tiny reports the smoothed loss.
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    torch.manual_seed(1)
    model = MLP(width=0.05)
    with torch.no_grad():
        lp = torch.log_softmax(model(batches[0][0]), 1)
    expected = float(
        (1 - eps) * nn.functional.nll_loss(lp, batches[0][1]) + eps * (-lp.mean(1)).mean()
    )
    recipe = TrainRecipe(label_smoothing=eps, schedule="constant")
    loss = train(model, batches, 1, 1e-12, recipe=recipe)
    assert loss == pytest.approx(expected, abs=1e-6)


def _lrs(schedule: str, steps: int, lr: float, max_lr: float | None = None, warmup=0.25):
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr, momentum=0.9)
    sched = make_scheduler(opt, schedule, steps, max_lr or lr, warmup)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return out, opt


def test_onecycle_lr_at_start_peak_and_end_and_momentum_kept():
    lrs, opt = _lrs("onecycle", 100, 0.01, max_lr=0.1)
    assert lrs[0] == pytest.approx(0.1 / 25)
    assert lrs[24] == pytest.approx(0.1)  # the peak: step warmup * steps - 1
    assert max(lrs) == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.1 / 25 / 1e4)
    assert all(b <= a for a, b in zip(lrs[24:], lrs[25:]))
    assert opt.param_groups[0]["momentum"] == 0.9


def test_cosine_and_constant_schedules():
    lrs, _ = _lrs("cosine", 10, 0.2)
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[5] == pytest.approx(0.1)  # half-way down the cosine
    lrs, _ = _lrs("constant", 5, 0.3)
    assert lrs == [0.3] * 5


def test_recipe_validation_names_the_problem():
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\), got 1.0"):
        TrainRecipe(label_smoothing=1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainRecipe(label_smoothing=float("nan"))
    with pytest.raises(ValueError, match="max_lr must be finite and > 0, got inf"):
        TrainRecipe(max_lr=float("inf"))
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainRecipe(schedule="step")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bf16 must be one of"):
        TrainRecipe(bf16="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="crop_padding must be >= 0"):
        TrainRecipe(crop_padding=-1)
    with pytest.raises(ValueError, match=r"warmup must lie in \(0, 1\)"):
        TrainRecipe(warmup=1.0)
    with pytest.raises(ValueError, match="nesterov needs optimizer 'sgd'"):
        resolve(TrainRecipe(nesterov=True), "cpu", "adam", 0.1)
    with pytest.raises(ValueError, match="learning rate must be finite"):
        train(MLP(width=0.05), _mnist_like(32), 1, float("nan"))


# --------------------------------------------------------------------------------------------
# precision and layout


def test_cpu_bf16_detection_reads_the_flags(tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor: 0\nflags\t: fpu sse avx2 avx512f\n")
    assert cpu_flags(fake) == frozenset({"fpu", "sse", "avx2", "avx512f"})
    fake.write_text("flags\t: avx2 amx_bf16 amx_tile\n")
    assert "amx_bf16" in cpu_flags(fake)


def test_bf16_is_unsupported_on_this_cpu_and_the_run_records_it():
    flags = cpu_flags()
    has = bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})
    assert bf16_supported("cpu") is has
    used = resolve(TrainRecipe.for_dataset("cifar10", "vgg"), "cpu", "sgd", 0.1)
    assert used.bf16 is has and used.bf16_supported is has and used.bf16_requested == "auto"
    assert used.augment and used.channels_last
    forced = resolve(TrainRecipe(bf16="on"), "cpu", "sgd", 0.1)
    assert forced.bf16 is True
    assert resolve(TrainRecipe(bf16="off"), "cpu", "sgd", 0.1).bf16 is False


def test_training_identity_drops_only_what_the_machine_supports():
    off = resolve(TrainRecipe(bf16="off"), "cpu", "sgd", 0.1).as_dict()
    other_machine = {**off, "bf16_supported": not off["bf16_supported"]}
    assert training_identity(off) == training_identity(other_machine)
    assert set(off) - set(training_identity(off)) == {"bf16_supported"}
    # What training used still tells runs apart: bf16 arithmetic against fp32.
    assert training_identity({**off, "bf16": True}) != training_identity(off)


def test_onecycle_peak_defaults_to_the_learning_rate():
    assert resolve(TrainRecipe(schedule="onecycle"), "cpu", "sgd", 0.05).peak_lr == 0.05
    used = resolve(TrainRecipe(schedule="onecycle", max_lr=0.1), "cpu", "sgd", 0.05)
    assert used.peak_lr == 0.1 and used.schedule == "onecycle"
    assert resolve(TrainRecipe(), "cpu", "adam", 0.05).schedule == "constant"


def test_channels_last_training_matches_contiguous_and_returns_contiguous_weights():
    batches = _cifar_like()
    torch.manual_seed(0)
    a = VGG(width=0.0625)
    b = VGG(width=0.0625)
    b.load_state_dict(a.state_dict())
    recipe = TrainRecipe(augment=True, nesterov=True, schedule="onecycle", max_lr=0.05)
    loss_a = train(a, batches, 1, 0.05, recipe=recipe, seed=5)
    loss_b = train(
        b,
        batches,
        1,
        0.05,
        recipe=TrainRecipe(**{**recipe.as_dict(), "channels_last": True}),
        seed=5,
    )
    assert math.isfinite(loss_a) and loss_a == pytest.approx(loss_b, rel=1e-4)
    for key, value in b.state_dict().items():
        assert value.is_contiguous(), key
        assert torch.allclose(value, a.state_dict()[key], atol=1e-4), key


def test_bf16_autocast_runs_and_changes_the_arithmetic():
    batches = _cifar_like(16)
    torch.manual_seed(0)
    a, b = VGG(width=0.0625), VGG(width=0.0625)
    b.load_state_dict(a.state_dict())
    loss_fp32 = train(a, batches, 1, 0.01, recipe=TrainRecipe(bf16="off"))
    loss_bf16 = train(b, batches, 1, 0.01, recipe=TrainRecipe(bf16="on"))
    assert math.isfinite(loss_bf16)
    assert loss_bf16 != loss_fp32  # bf16 rounding shows
    assert loss_bf16 == pytest.approx(loss_fp32, rel=0.05)
    assert all(v.dtype != torch.bfloat16 for v in b.state_dict().values())


def test_augmented_training_is_reproducible_with_a_seed():
    batches = _cifar_like()

    def run(seed):
        torch.manual_seed(0)
        model = VGG(width=0.0625)
        loss = train(model, batches, 1, 0.05, recipe=TrainRecipe(augment=True), seed=seed)
        return loss, model.state_dict()

    (l1, s1), (l2, s2), (l3, _) = run(1), run(1), run(2)
    assert l1 == l2 and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert l3 != l1
