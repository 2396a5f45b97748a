"""Run-config and node-config validation: good values load, bad values name key and value."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

from client.config import NodeDataConfig
from rebasin.models import MLP, VGG, ResNet20
from rebasin.zoo import build_model, check_model_fits_dataset
from server.app import build_strategy
from server.config import ServerConfig, load_server_config
from strategies.run_config import RunConfigError, TrainingConfig

pytestmark = pytest.mark.timeout(60)


def _pyproject_run_config() -> dict:
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_pyproject_declares_exactly_the_server_config_keys() -> None:
    # `flwr run --run-config` can only override keys that pyproject.toml declares, so every
    # key the apps read must be there, and nothing else (ServerConfig forbids unknown keys).
    declared = set(_pyproject_run_config())
    expected = {field.alias for field in ServerConfig.model_fields.values()}
    assert declared == expected


def test_pyproject_defaults_are_valid() -> None:
    config = load_server_config(_pyproject_run_config())
    assert config.strategy == "rebasin"
    assert config.model == "mlp" and config.dataset == "mnist"


def test_kebab_keys_map_to_fields_and_ints_are_accepted_for_floats() -> None:
    config = load_server_config(
        {"num-server-rounds": 5, "learning-rate": 1, "local-epochs": 3, "independent-start": True}
    )
    assert config.num_server_rounds == 5
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.local_epochs == 3
    assert config.independent_start is True


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        (
            {"learning-rate": -1.0},
            "invalid run-config: 'learning-rate' = -1.0: Input should be greater than 0",
        ),
        ({"learnig-rate": 0.1}, "invalid run-config: unknown key 'learnig-rate' (= 0.1)"),
        (
            {"local-epochs": "two"},
            "invalid run-config: 'local-epochs' = 'two': Input should be a valid integer",
        ),
        (
            {"local-epochs": 1.5},
            "invalid run-config: 'local-epochs' = 1.5: Input should be a valid integer",
        ),
        (
            {"independent-start": 1},
            "invalid run-config: 'independent-start' = 1: Input should be a valid boolean",
        ),
        (
            {"strategy": "fedprox"},
            "invalid run-config: 'strategy' = 'fedprox': Input should be 'rebasin' or 'fedavg'",
        ),
        (
            {"reference": "median"},
            "invalid run-config: 'reference' = 'median': Input should be 'global', 'largest' "
            "or 'merge-many'",
        ),
        (
            {"fraction-train": 0.0},
            "invalid run-config: 'fraction-train' = 0.0: Input should be greater than 0",
        ),
        (
            {"num-server-rounds": 0},
            "invalid run-config: 'num-server-rounds' = 0: Input should be greater than or "
            "equal to 1",
        ),
        (
            {"weight-decay": -1},
            "invalid run-config: 'weight-decay' = -1: Input should be greater than or equal to 0",
        ),
        (
            {"server-data-dir": 5},
            "invalid run-config: 'server-data-dir' = 5: Input should be a valid string",
        ),
        (
            {"model": "vgg"},
            "invalid run-config: model 'vgg' needs 3x32x32 images, but dataset 'mnist' has "
            "1x28x28; use model 'mlp' or 'vit' for 'mnist'",
        ),
        (
            {"bn-recalibration": True},
            "invalid run-config: 'bn-recalibration' = True needs a model with BatchNorm, but "
            "model 'mlp' has no normalisation; set 'bn-recalibration' = false or use model "
            "'vgg'/'resnet20' with norm 'batch'",
        ),
        (
            {"model": "resnet20", "dataset": "cifar10", "norm": "layer", "bn-recalibration": True},
            "invalid run-config: 'bn-recalibration' = True needs a model with BatchNorm, but "
            "model 'resnet20' uses norm 'layer'; set 'bn-recalibration' = false or use model "
            "'vgg'/'resnet20' with norm 'batch'",
        ),
    ],
)
def test_bad_run_config_values_are_named(run_config: dict, message: str) -> None:
    with pytest.raises(RunConfigError) as info:
        load_server_config(run_config)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "key", ["width", "learning-rate", "dirichlet-alpha", "max-norm-ratio", "round-timeout"]
)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_run_config_floats_must_be_finite(key: str, value: float) -> None:
    with pytest.raises(RunConfigError) as info:
        load_server_config({key: value})
    assert str(info.value) == (
        f"invalid run-config: {key!r} = {value!r}: Input should be a finite number"
    )


def test_max_norm_ratio_reaches_the_strategy() -> None:
    config = load_server_config({"max-norm-ratio": 50.0})
    strategy = build_strategy(config, config.build_model())
    assert strategy.options.max_norm_ratio == 50.0
    default = load_server_config({})
    assert build_strategy(default, default.build_model()).options.max_norm_ratio == 1000.0


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(RunConfigError) as info:
        load_server_config({"batch-size": 0, "width": -0.5})
    assert str(info.value) == (
        "invalid run-config: 'width' = -0.5: Input should be greater than 0; "
        "'batch-size' = 0: Input should be greater than or equal to 1"
    )


def test_client_side_ignores_server_keys_but_validates_its_own() -> None:
    config = TrainingConfig.from_mapping({"num-server-rounds": 3, "batch-size": 8})
    assert config.batch_size == 8
    with pytest.raises(RunConfigError, match=r"^invalid run-config: 'batch-size' = 0: "):
        TrainingConfig.from_mapping({"num-server-rounds": 3, "batch-size": 0})


def test_training_config_is_the_client_view_of_the_server_config() -> None:
    server = load_server_config({"width": 0.5, "seed": 3, "num-server-rounds": 7})
    client = server.training_config()
    assert type(client) is TrainingConfig
    assert client.width == 0.5 and client.seed == 3


def test_weight_decay_is_a_client_key_validated_on_the_client_side() -> None:
    assert TrainingConfig.from_mapping({}).weight_decay == 0.0  # published results: none
    assert TrainingConfig.from_mapping({"weight-decay": 5e-4}).weight_decay == 5e-4
    with pytest.raises(RunConfigError) as info:
        TrainingConfig.from_mapping({"weight-decay": -1})
    assert str(info.value) == (
        "invalid run-config: 'weight-decay' = -1: Input should be greater than or equal to 0"
    )


def test_server_data_dir_stays_on_the_server() -> None:
    server = load_server_config({"server-data-dir": "/srv/eval", "weight-decay": 1e-4})
    assert server.server_data_dir == "/srv/eval"
    client = server.training_config()
    assert "server-data-dir" not in client.to_mapping()
    assert client.weight_decay == 1e-4
    # The ClientApp gets the whole run-config, server keys included, and ignores them.
    assert TrainingConfig.from_mapping(server.to_mapping()) == client


def test_server_data_path_falls_back_to_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REBASIN_DATA_DIR", str(tmp_path / "env"))
    assert load_server_config({}).server_data_path == tmp_path / "env"
    config = load_server_config({"server-data-dir": str(tmp_path / "key")})
    assert config.server_data_path == tmp_path / "key"
    home = load_server_config({"server-data-dir": "~/eval"}).server_data_path
    assert home == tmp_path / "home" / "eval"
    # Relative: left for the ServerApp's working directory to resolve.
    assert load_server_config({"server-data-dir": "eval"}).server_data_path == Path("eval")
    monkeypatch.delenv("REBASIN_DATA_DIR")
    assert load_server_config({}).server_data_path == Path("data")


def test_cuda_device_without_cuda_is_refused() -> None:
    config = load_server_config({"device": "cuda"})
    if torch.cuda.is_available():
        assert config.torch_device == torch.device("cuda")
    else:
        with pytest.raises(RunConfigError) as info:
            _ = config.torch_device
        assert str(info.value) == "invalid run-config: 'device' = 'cuda': CUDA is not available"


# --- node-config -------------------------------------------------------------------------


def test_node_config_partition_and_region() -> None:
    node = NodeDataConfig.from_mapping({"partition-id": 1, "num-partitions": 3})
    assert node.partition == (1, 3)
    assert NodeDataConfig.from_mapping({}).partition is None
    assert NodeDataConfig.from_mapping({"region": "eu"}).partition == (1, 2)
    assert NodeDataConfig.from_mapping({"region": "us", "partition-id": 0}).partition == (0, 2)
    three = NodeDataConfig.from_mapping({"region": "region-2", "num-partitions": 3})
    assert three.partition == (2, 3)


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        (
            {"partition-id": 2, "num-partitions": 2},
            "invalid node-config: node-config 'partition-id' = 2 must be < 'num-partitions' = 2",
        ),
        (
            {"partition-id": 0},
            "invalid node-config: node-config needs both 'partition-id' and 'num-partitions' "
            "or neither, got partition-id=0, num-partitions=None",
        ),
        (
            {"region": "asia"},
            "invalid node-config: node-config 'region' = 'asia' is not one of the 2 regions "
            "['us', 'eu']",
        ),
        (
            {"region": "eu", "partition-id": 0},
            "invalid node-config: node-config 'region' = 'eu' is partition 1, but "
            "'partition-id' = 0; give one of them",
        ),
        (
            {"partition-id": -1, "num-partitions": 2},
            "invalid node-config: 'partition-id' = -1: Input should be greater than or equal to 0",
        ),
    ],
)
def test_bad_node_config_values_are_named(node_config: dict, message: str) -> None:
    with pytest.raises(RunConfigError) as info:
        NodeDataConfig.from_mapping(node_config, what="node-config")
    assert str(info.value) == message


# --- model factory -----------------------------------------------------------------------


def test_build_model_fits_the_dataset_and_is_seeded() -> None:
    mlp = build_model("mlp", "mnist", width=0.25, seed=4)
    assert isinstance(mlp, MLP)
    assert mlp.layers[0].weight.shape == (128, 784) and mlp.head.weight.shape == (10, 128)
    again = build_model("mlp", "mnist", width=0.25, seed=4)
    pairs = zip(mlp.state_dict().values(), again.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    other = build_model("mlp", "mnist", width=0.25, seed=5)
    assert not torch.equal(mlp.layers[0].weight, other.layers[0].weight)
    assert isinstance(build_model("vgg", "cifar10", width=0.125, norm="layer"), VGG)
    assert isinstance(build_model("resnet20", "cifar10"), ResNet20)


def test_build_model_leaves_the_global_random_state_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_model("mlp", "mnist", width=0.0625, seed=123)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("name", "dataset", "message"),
    [
        (
            "lenet",
            "mnist",
            "unknown model 'lenet'; expected one of ('mlp', 'vgg', 'resnet20', 'vit')",
        ),
        ("mlp", "svhn", "unknown dataset 'svhn'; expected one of ('mnist', 'cifar10')"),
        (
            "resnet20",
            "mnist",
            "model 'resnet20' needs 3x32x32 images, but dataset 'mnist' has 1x28x28; use "
            "model 'mlp' or 'vit' for 'mnist'",
        ),
    ],
)
def test_model_factory_names_bad_combinations(name: str, dataset: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        check_model_fits_dataset(name, dataset)
    assert str(info.value) == message


def test_build_model_refuses_non_positive_width() -> None:
    with pytest.raises(ValueError, match=r"^width must be > 0, got 0.0$"):
        build_model("mlp", "mnist", width=0.0)
