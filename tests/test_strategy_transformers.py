"""ReBasinFedAvg with the zoo's ViT (--model vit): structured specs (Concat/Grid axes) through
the strategy's matcher, warm starts and merge."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from rebasin.permute import apply_permutation, random_perms
from rebasin.zoo import build_model
from strategies import ReBasinFedAvg


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


def _reply(node_id: int, state_dict: dict, num_examples: int) -> Message:
    metrics = MetricRecord({"loss": 0.5, "num-examples": num_examples})
    content = RecordDict({"arrays": ArrayRecord(state_dict), "metrics": metrics})
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.TRAIN)
    return Message(content, reply_to=instruction)


def test_permuted_vits_merge_back_to_the_original() -> None:
    model = build_model("vit", "mnist", width=0.25, seed=0).eval()
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = model.permutation_spec()
    permuted = {
        n: {
            k: v.clone()
            for k, v in apply_permutation(spec, random_perms(spec, original, n), original).items()
        }
        for n in (1, 2)
    }
    strategy = ReBasinFedAvg(model=model, device="cpu", min_train_nodes=2)
    strategy.set_global_arrays(ArrayRecord(original))
    arrays, _ = strategy.aggregate_train(1, [_reply(n, permuted[n], 10 * n) for n in (1, 2)])
    merged = dict(arrays.to_torch_state_dict())
    for key, value in original.items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=0, msg=key)
    for n in (1, 2):
        aligned = apply_permutation(spec, strategy.last_perms[n], permuted[n])
        assert all(torch.equal(aligned[k], original[k]) for k in original)
        assert {"R", "H0", "QK0", "VO0"} <= set(strategy.warm_starts[n])
