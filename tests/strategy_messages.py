"""Flower messages and a grid in memory, for the Message-API strategy tests (no network)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from rebasin.models import MLP
from rebasin.permute import apply_permutation, random_perms
from strategies import ReBasinFedAvg

StateDict = dict[str, torch.Tensor]


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages read the run and node of the running ServerApp; pretend to be one."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


def _mlp(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(in_features=20, hidden=(32, 32), num_classes=5)


def _sd(model: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


SPEC = _mlp(0).permutation_spec()


def _permuted(state_dict: StateDict, seed: int) -> StateDict:
    """A permuted copy (cloned: apply_permutation shares the tensors it does not move)."""
    permuted = apply_permutation(SPEC, random_perms(SPEC, state_dict, seed), state_dict)
    return {k: v.clone() for k, v in permuted.items()}


def _instruction(node_id: int) -> Message:
    return Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)


def _reply(node_id: int, state_dict: StateDict, num_examples: object = 10, **metrics) -> Message:
    metric_record = MetricRecord({"loss": 0.5 + node_id / 100, **metrics})
    if num_examples is not None:
        metric_record["num-examples"] = num_examples
    content = RecordDict({"arrays": ArrayRecord(state_dict), "metrics": metric_record})
    return Message(content, reply_to=_instruction(node_id))


def _strategy(global_sd: StateDict, **kwargs) -> ReBasinFedAvg:
    kwargs.setdefault("min_train_nodes", 2)
    strategy = ReBasinFedAvg(model=_mlp(0), device="cpu", **kwargs)
    strategy.set_global_arrays(ArrayRecord(global_sd))
    return strategy


def _tensors(arrays: ArrayRecord) -> StateDict:
    return dict(arrays.to_torch_state_dict())


def _assert_equal(a: StateDict, b: StateDict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _assert_close(a: StateDict, b: StateDict, atol: float = 1e-6) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


class _FakeGrid:
    """A Grid stand-in: fixed node ids; each node answers with ``client(node_id, message)``."""

    def __init__(self, node_ids: list[int], client: Callable[[int, Message], Message]) -> None:
        self.node_ids = node_ids
        self.client = client

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        return [self.client(m.metadata.dst_node_id, m) for m in messages]
