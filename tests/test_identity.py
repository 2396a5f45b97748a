"""Model identity: one type for the ServerApp, its checkpoints and ``rebasin merge``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rebasin.names import DATASET_NAMES, MODEL_NAMES, NORM_KINDS
from server.app import model_identity
from server.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from server.config import ServerConfig
from server.identity import (
    IDENTITY_FIELDS,
    IdentityError,
    ModelIdentity,
    parse_field,
    resolve_identity,
    shown,
)

pytestmark = pytest.mark.timeout(60)

# What the ServerApp's checkpoints stored before ModelIdentity (server.app.model_identity).
STORED = {"model": "mlp", "width": "0.25", "norm": "batch", "dataset": "mnist"}


def test_round_trip_through_the_string_metadata() -> None:
    for identity in (
        ModelIdentity("mlp", "mnist", 0.25),
        ModelIdentity("vgg", "cifar10", 0.1, "layer"),
        ModelIdentity("resnet20", "cifar10", 3, "none"),
    ):
        metadata = identity.to_metadata()
        assert list(metadata) == list(IDENTITY_FIELDS)
        assert all(isinstance(v, str) for v in metadata.values())
        assert metadata["width"] == repr(identity.width)
        assert ModelIdentity.from_metadata(metadata, "f") == identity
    assert ModelIdentity("resnet20", "cifar10", 3).width == 3.0
    assert type(ModelIdentity("resnet20", "cifar10", 3).width) is float
    assert ModelIdentity("mlp", "mnist") == ModelIdentity("mlp", "mnist", 1.0, "batch")


def test_existing_checkpoint_metadata_reads_and_writes_the_same() -> None:
    identity = ModelIdentity.from_metadata(STORED, "old.safetensors")
    assert identity == ModelIdentity("mlp", "mnist", 0.25, "batch")
    assert identity.to_metadata() == STORED
    config = ServerConfig(model="mlp", dataset="mnist", width=0.25)
    assert model_identity(config) == identity
    assert model_identity(config).to_metadata() == STORED


def test_widths_compare_as_numbers() -> None:
    for text in ("0.250", "0.25", "2.5e-1", "0.2500000"):
        stored = ModelIdentity.from_metadata({**STORED, "width": text}, "f")
        assert stored == ModelIdentity("mlp", "mnist", 0.25)
        assert stored.width == 0.25
        assert (
            ModelIdentity("mlp", "mnist", 0.25).difference({**STORED, "width": text}, "f") is None
        )
    assert ModelIdentity("mlp", "mnist", 0.25) != ModelIdentity("mlp", "mnist", 0.125)
    assert parse_field("width", "0.250", "f") == 0.25
    assert (shown(0.25), shown(1.0), shown(0.1 + 0.2), shown("mlp")) == (
        "0.25",
        "1",
        "0.30000000000000004",
        "mlp",
    )


def test_difference_names_the_first_field_that_differs() -> None:
    identity = ModelIdentity("mlp", "mnist", 0.25)
    assert identity.difference(STORED, "f") is None
    assert identity.difference({**STORED, "norm": "layer"}, "f") == "norm"
    assert identity.difference({**STORED, "dataset": "cifar10", "norm": "layer"}, "f") == "dataset"
    without_width = {k: v for k, v in STORED.items() if k != "width"}
    assert identity.difference(without_width, "f") == "width"
    with pytest.raises(IdentityError) as info:
        identity.difference({**STORED, "width": "wide"}, "f.safetensors")
    assert str(info.value) == "f.safetensors: metadata width 'wide' is not a number > 0"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("width", "wide", "metadata width 'wide' is not a number > 0"),
        ("width", "0", "metadata width '0' is not a number > 0"),
        ("width", "-0.25", "metadata width '-0.25' is not a number > 0"),
        ("width", "nan", "metadata width 'nan' is not a number > 0"),
        ("width", "inf", "metadata width 'inf' is not a number > 0"),
        ("width", "", "metadata width '' is not a number > 0"),
        ("model", "bert", f"metadata model 'bert' is not one of {', '.join(MODEL_NAMES)}"),
        ("model", "MLP", f"metadata model 'MLP' is not one of {', '.join(MODEL_NAMES)}"),
        (
            "dataset",
            "imagenet",
            f"metadata dataset 'imagenet' is not one of {', '.join(DATASET_NAMES)}",
        ),
        ("norm", "group", f"metadata norm 'group' is not one of {', '.join(NORM_KINDS)}"),
    ],
)
def test_bad_values_are_named_with_the_file(key: str, value: str, message: str) -> None:
    with pytest.raises(IdentityError) as info:
        ModelIdentity.from_metadata({**STORED, key: value}, "run/round-0003.safetensors")
    assert str(info.value) == f"run/round-0003.safetensors: {message}"


def test_missing_fields_are_named_with_the_file() -> None:
    with pytest.raises(IdentityError) as info:
        ModelIdentity.from_metadata({"model": "mlp", "norm": "batch"}, "a.safetensors")
    assert str(info.value) == "a.safetensors: metadata has no dataset, width"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": "bert"}, f"model 'bert' is not one of {', '.join(MODEL_NAMES)}"),
        ({"dataset": "svhn"}, f"dataset 'svhn' is not one of {', '.join(DATASET_NAMES)}"),
        ({"norm": "group"}, f"norm 'group' is not one of {', '.join(NORM_KINDS)}"),
        ({"width": 0.0}, "width 0.0 is not a number > 0"),
        ({"width": math.inf}, "width inf is not a number > 0"),
        ({"width": math.nan}, "width nan is not a number > 0"),
        ({"width": "0.25"}, "width '0.25' is not a number > 0"),
        ({"width": True}, "width True is not a number > 0"),
    ],
)
def test_the_constructor_refuses_bad_values(fields: dict, message: str) -> None:
    values = {"model": "mlp", "dataset": "mnist", "width": 0.25, "norm": "batch", **fields}
    with pytest.raises(IdentityError) as info:
        ModelIdentity(**values)
    assert str(info.value) == message


def test_a_checkpoint_compares_its_width_as_a_number(tmp_path: Path) -> None:
    # A checkpoint written by another tool as "0.250" is the run's width 0.25.
    state_dict = ModelIdentity("mlp", "mnist", 0.25).build_model(seed=0).state_dict()
    path = tmp_path / "round-0001.safetensors"
    header = {"format": CHECKPOINT_FORMAT, "round": "1", **STORED, "width": "0.250"}
    save_file(dict(state_dict), str(path), metadata=header)
    checkpoint = load_checkpoint(
        path, reference=state_dict, identity=ModelIdentity("mlp", "mnist", 0.25)
    )
    assert checkpoint.round == 1
    assert all(torch.equal(checkpoint.state_dict[k], v) for k, v in state_dict.items())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, identity=ModelIdentity("mlp", "mnist", 0.5))
    assert str(info.value) == (
        f"checkpoint {path} was written for width='0.250', but this run has width='0.5'"
    )
    header["width"] = "a quarter"
    save_file(dict(state_dict), str(path), metadata=header)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, identity=ModelIdentity("mlp", "mnist", 0.25))
    assert str(info.value) == f"checkpoint {path}: metadata width 'a quarter' is not a number > 0"
    # Without the identity fields: named as written for nothing.
    save_file(dict(state_dict), str(path), metadata={"format": CHECKPOINT_FORMAT, "round": "1"})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, identity=ModelIdentity("mlp", "mnist", 0.25))
    assert str(info.value) == (
        f"checkpoint {path} was written for model=None, but this run has model='mlp'"
    )


def test_resolve_takes_what_is_not_given_from_the_files() -> None:
    files = [Path("a"), Path("b"), Path("c")]
    metadata = [{**STORED, "width": "0.250"}, {}, {"model": "mlp", "width": "0.25"}]
    resolved = resolve_identity(files, metadata, model=None, dataset=None, width=None, norm="batch")
    assert resolved.from_metadata == ("model", "dataset", "width")
    assert resolved.identity() == ModelIdentity("mlp", "mnist", 0.25, "batch")
    assert resolved.describe() == (
        "architecture: mlp on mnist, width 0.25, norm batch (model, dataset, width from file "
        "metadata)"
    )
    nothing = resolve_identity(files, [{}, {}, {}], model=None, dataset=None, width=None, norm=None)
    assert (nothing.model, nothing.dataset, nothing.width, nothing.norm) == (
        None,
        None,
        1.0,
        "batch",
    )
    assert nothing.from_metadata == ()
    with pytest.raises(IdentityError) as info:
        nothing.identity()
    assert str(info.value) == "the model and the data set are not known"
    with pytest.raises(IdentityError) as info:
        resolve_identity(files, metadata, model=None, dataset=None, width=0.5, norm=None)
    assert str(info.value) == "a: its metadata has width 0.25, but --width is 0.5"
    with pytest.raises(IdentityError) as info:
        resolve_identity(
            files, [STORED, {}, {"norm": "none"}], model=None, dataset=None, width=None, norm=None
        )
    assert str(info.value) == "inputs disagree on norm: a has batch, c has none"
