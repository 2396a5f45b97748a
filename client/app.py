"""The ClientApp: local training, local evaluation and the BatchNorm-statistics query.

What to train comes from the run-config (:class:`strategies.run_config.TrainingConfig`, the
same keys the ServerApp reads); where the data is and which part of it this node holds comes
from the node-config (:class:`client.config.NodeDataConfig`). A bad value in either raises,
and Flower returns the error to the server, which logs it with this node's id.

Replies carry the model under ``arrays`` and metrics under ``metrics`` with ``num-examples``,
as Flower's FedAvg (and so ReBasinFedAvg) expects.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from client.config import NodeDataConfig
from client.data import local_data
from rebasin.norm import batchnorm_stats
from rebasin.train import evaluate as evaluate_model
from rebasin.train import train as train_model
from strategies.bn_query import QUERY_ACTION, stats_to_record
from strategies.run_config import TrainingConfig

logger = logging.getLogger("flwr.rebasin." + __name__)

app = ClientApp()


def _configs(context: Context) -> tuple[TrainingConfig, NodeDataConfig]:
    config = TrainingConfig.from_mapping(context.run_config, what="run-config")
    node = NodeDataConfig.from_mapping(context.node_config, what="node-config")
    return config, node


def _server_round(msg: Message) -> int:
    """The round the server says this is (FedAvg puts it in the config record)."""
    config = msg.content.config_records.get("config")
    value = config.get("server-round") if config is not None else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"message has no integer 'server-round' in its config, got {value!r}")
    return value


def own_seed(config: TrainingConfig, node: NodeDataConfig, node_id: int) -> int:
    """This node's seed for an independent start: node-config ``seed``, else derived.

    The derived seed differs from the run seed (which initialises the global model) and
    between partitions, so every client starts from its own random model.
    """
    if node.seed is not None:
        return node.seed
    key = node.partition_id if node.partition_id is not None else node_id % (2**31)
    return config.seed + 1 + key


def _received_model(config: TrainingConfig, msg: Message) -> nn.Module:
    """The model architecture of ``config`` with the weights the server sent."""
    model = config.build_model()
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model (or, with independent start in round 1, a fresh one)."""
    config, node = _configs(context)
    server_round = _server_round(msg)
    if config.independent_start and server_round == 1:
        seed = own_seed(config, node, context.node_id)
        logger.info("independent start: round 1 trains from this node's seed %d", seed)
        model = config.build_model(seed=seed)
    else:
        model = _received_model(config, msg)
    data = local_data(config, node, train=True)
    model.to(config.torch_device)
    loader = data.loader(config.batch_size, shuffle=True, seed=config.seed + server_round)
    loss = train_model(
        model,
        loader,
        config.local_epochs,
        config.learning_rate,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        recipe=config.recipe(),
        seed=config.seed + server_round,  # the augmentation's crops and flips
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.cpu().state_dict()),
            "metrics": MetricRecord({"train-loss": float(loss), "num-examples": len(data)}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this node's part of the test split."""
    config, node = _configs(context)
    model = _received_model(config, msg).to(config.torch_device)
    data = local_data(config, node, train=False)
    result = evaluate_model(model, data.loader(config.batch_size))
    metrics = {
        "eval-loss": result.loss,
        "eval-acc": result.accuracy,
        "num-examples": result.num_examples,
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query(QUERY_ACTION)
def batchnorm_statistics(msg: Message, context: Context) -> Message:
    """Per-layer BatchNorm moments of the received model on this node's training data."""
    config, node = _configs(context)
    model = _received_model(config, msg).to(config.torch_device)
    data = local_data(config, node, train=True)
    stats = batchnorm_stats(model, data.loader(config.batch_size))
    return Message(content=stats_to_record(stats), reply_to=msg)
