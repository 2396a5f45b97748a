"""Settings that ``rebasin simulate`` and ``rebasin study`` share: options and validation.

The typer option types below are declared once and used by both commands, so a shared flag
reads the same in both ``--help`` pages; each command gives the default in its own signature.
Options whose help differs between the commands are declared in the command.

This module is imported when the CLI starts: it imports typer and nothing heavy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rebasin.names import DATASET_NAMES, NORM_KINDS, OPTIMIZER_NAMES

DatasetOption = Annotated[str, typer.Option(help=" or ".join(DATASET_NAMES))]
NormOption = Annotated[
    str, typer.Option(help=f"vgg/resnet20 normalisation: {', '.join(NORM_KINDS)}")
]
LearningRateOption = Annotated[float, typer.Option(help="learning rate")]
OptimizerOption = Annotated[
    str, typer.Option(help=f"{' or '.join(OPTIMIZER_NAMES)} (sgd: momentum, cosine)")
]
BatchSizeOption = Annotated[int, typer.Option(help="batch size")]
LimitPerClassOption = Annotated[
    int | None, typer.Option(help="use the first N training examples of each class")
]
TestLimitPerClassOption = Annotated[
    int | None, typer.Option(help="use the first N test examples of each class")
]
MaxIterOption = Annotated[int, typer.Option(min=1, help="most weight-matching sweeps")]
DataDirOption = Annotated[
    Path | None,
    typer.Option(envvar="REBASIN_DATA_DIR", help="data directory (MNIST/raw, CIFAR-10)"),
]
ThreadsOption = Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's)")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="log at INFO")]

# Training recipe (rebasin.recipe.TrainRecipe); None: the dataset's default.
AugmentOption = Annotated[
    bool | None,
    typer.Option(
        "--augment/--no-augment",
        help="random crop (pad 4) + flip on each batch [default: on for cifar10, off for mnist]",
    ),
]
LabelSmoothingOption = Annotated[float, typer.Option(help="label smoothing in [0, 1)")]
ScheduleOption = Annotated[
    str | None,
    typer.Option(
        help="learning-rate schedule: cosine, onecycle or constant [default: cosine with "
        "sgd, constant with adam]"
    ),
]
MaxLrOption = Annotated[
    float | None, typer.Option(help="one-cycle peak learning rate [default: --lr]")
]
NesterovOption = Annotated[bool, typer.Option(help="Nesterov momentum (sgd)")]
ChannelsLastOption = Annotated[
    bool | None,
    typer.Option(
        "--channels-last/--no-channels-last",
        help="train in channels_last order [default: on for vgg/resnet20 on cifar10]",
    ),
]
Bf16Option = Annotated[
    str | None,
    typer.Option(
        help="bf16 autocast: auto (where the CPU/GPU has bf16 units), on, off [default: auto "
        "for cifar10, off for mnist]"
    ),
]


def check_seeds(seeds: tuple[int, ...]) -> tuple[int, ...]:
    """``seeds`` unchanged if they are non-negative and distinct.

    Raises
    ------
    ValueError
        Naming the seeds, if one is negative or one repeats.
    """
    if any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be >= 0, got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    return seeds
