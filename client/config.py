"""A SuperNode's node-config: where its data is and which part of it this node holds.

In a simulation Flower sets ``partition-id`` and ``num-partitions`` for every virtual node.
In a deployment each ``flower-supernode`` is started with its own ``--node-config``, for
example ``--node-config 'data-dir="/data" partition-id=0 num-partitions=2'`` or
``--node-config 'data-dir="/data/eu" region="eu"'``; without a partition the node trains on
the whole dataset found in its data directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import Field, model_validator

from rebasin.data import resolve_data_dir
from rebasin.partition import region_names
from strategies.run_config import KebabConfig


class NodeDataConfig(KebabConfig):
    """The node-config keys a ClientApp reads (other keys are ignored).

    Attributes
    ----------
    partition_id, num_partitions
        This node's part of the dataset, ``0 <= partition-id < num-partitions``; both or
        neither.
    region
        With run-config ``partitioning = "region"``: the region this node is, by name
        (``"us"``/``"eu"`` for two regions, ``"region-<k>"`` otherwise); sets
        ``partition-id`` and, if not given, ``num-partitions = 2``.
    data_dir
        The node's data directory (``""``: ``$REBASIN_DATA_DIR``, else ``./data``).
    seed
        This node's own seed for ``independent-start`` (default: derived from the run seed
        and the partition or node id).
    """

    partition_id: int | None = Field(default=None, ge=0)
    num_partitions: int | None = Field(default=None, ge=1)
    region: str = ""
    data_dir: str = ""
    seed: int | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _region_sets_partition(cls, values: Any) -> Any:
        if not isinstance(values, dict) or not values.get("region"):
            return values
        region = values["region"]
        if not isinstance(region, str):
            return values  # the field's own type check reports it
        count = values.get("num-partitions", 2)
        names = region_names(count) if isinstance(count, int) and count >= 1 else []
        if region not in names:
            raise ValueError(
                f"node-config 'region' = {region!r} is not one of the {count} regions {names}"
            )
        index = names.index(region)
        given = values.get("partition-id")
        if given is not None and given != index:
            raise ValueError(
                f"node-config 'region' = {region!r} is partition {index}, but 'partition-id' = "
                f"{given!r}; give one of them"
            )
        return {**values, "partition-id": index, "num-partitions": count}

    @model_validator(mode="after")
    def _partition_in_range(self) -> Self:
        if (self.partition_id is None) != (self.num_partitions is None):
            raise ValueError(
                "node-config needs both 'partition-id' and 'num-partitions' or neither, got "
                f"partition-id={self.partition_id!r}, num-partitions={self.num_partitions!r}"
            )
        if self.partition_id is not None and self.partition_id >= self.num_partitions:
            raise ValueError(
                f"node-config 'partition-id' = {self.partition_id} must be < "
                f"'num-partitions' = {self.num_partitions}"
            )
        return self

    @property
    def data_path(self) -> Path:
        """The resolved data directory."""
        return resolve_data_dir(self.data_dir or None)

    @property
    def partition(self) -> tuple[int, int] | None:
        """``(partition_id, num_partitions)``, or ``None`` for the whole dataset."""
        if self.partition_id is None or self.num_partitions is None:
            return None
        return self.partition_id, self.num_partitions
