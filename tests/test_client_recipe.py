"""The ClientApp trains with the training recipe of the run-config (issue 13): CIFAR-10 gets
random crop + flip by default, as in ``rebasin simulate``, and every recipe key is validated.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from server_grid import GridWithDeadNodes, quick_config
from test_server_bn_recalibration import BN_RUN, _synthetic_cifar

import client.app as client_app_module
from rebasin.recipe import TrainRecipe
from rebasin.train import train as real_train
from server.app import run_server
from server.config import load_server_config
from strategies.run_config import RunConfigError, TrainingConfig

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("serverapp_run")]


def test_recipe_defaults_follow_the_dataset() -> None:
    assert TrainingConfig.from_mapping({}).recipe() == TrainRecipe()  # MNIST: original loop
    cifar = TrainingConfig.from_mapping({"model": "vgg", "dataset": "cifar10"}).recipe()
    assert cifar == TrainRecipe(augment=True, channels_last=True, bf16="auto")


def test_recipe_keys_override_the_defaults() -> None:
    config = TrainingConfig.from_mapping(
        {
            "model": "resnet20",
            "dataset": "cifar10",
            "augment": "off",
            "channels-last": "off",
            "bf16": "off",
            "label-smoothing": 0.1,
            "schedule": "onecycle",
            "max-lr": 0.2,
            "nesterov": True,
        }
    )
    assert config.recipe() == TrainRecipe(
        label_smoothing=0.1, schedule="onecycle", max_lr=0.2, nesterov=True
    )
    mnist = TrainingConfig.from_mapping({"augment": "on", "schedule": "constant"}).recipe()
    assert mnist == TrainRecipe(augment=True, schedule="constant")


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        (
            {"augment": True},
            "invalid run-config: 'augment' = True: Input should be 'auto', 'on' or 'off'",
        ),
        (
            {"schedule": "step"},
            "invalid run-config: 'schedule' = 'step': Input should be 'auto', 'cosine', "
            "'onecycle' or 'constant'",
        ),
        (
            {"label-smoothing": 1.0},
            "invalid run-config: 'label-smoothing' = 1.0: Input should be less than 1",
        ),
        (
            {"max-lr": -0.1},
            "invalid run-config: 'max-lr' = -0.1: Input should be greater than or equal to 0",
        ),
        (
            {"nesterov": True, "optimizer": "adam"},
            "invalid run-config: 'nesterov' = true needs 'optimizer' = 'sgd', got 'adam'",
        ),
        (
            {"max-lr": 0.3},
            "invalid run-config: 'max-lr' = 0.3 is the one-cycle peak; it needs 'schedule' = "
            "'onecycle', got 'auto'",
        ),
    ],
)
def test_bad_recipe_keys_are_named(run_config: dict, message: str) -> None:
    with pytest.raises(RunConfigError) as info:
        load_server_config(run_config)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("overrides", "augment"), [({}, True), ({"augment": "off", "label-smoothing": 0.1}, False)]
)
def test_client_app_trains_cifar_with_the_run_configs_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict, augment: bool
) -> None:
    seen: list[tuple[TrainRecipe, int]] = []

    def recording_train(*args, recipe, seed, **kwargs):
        seen.append((recipe, seed))
        return real_train(*args, recipe=recipe, seed=seed, **kwargs)

    monkeypatch.setattr(client_app_module, "local_data", _synthetic_cifar)
    monkeypatch.setattr(client_app_module, "train_model", recording_train)
    run_config, config = quick_config(tmp_path, **{**BN_RUN, "num-server-rounds": 2, **overrides})
    run_server(GridWithDeadNodes(run_config), config)

    expected = TrainRecipe(
        augment=augment,
        channels_last=True,
        bf16="auto",
        label_smoothing=overrides.get("label-smoothing", 0.0),
    )
    # Two nodes, two rounds; the augmentation is seeded by the run seed and the round.
    assert seen == [(expected, 1), (expected, 1), (expected, 2), (expected, 2)]
