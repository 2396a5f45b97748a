"""plugin-app: a Flower / PyTorch ServerApp, as in Flower's PyTorch quickstart."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from plugin_app.task import Net
from strategies import ReBasinFedAvg

# The only change from Flower's PyTorch quickstart: ReBasinFedAvg instead of
# `from flwr.serverapp.strategy import FedAvg`.

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["lr"]

    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # The quickstart has: strategy = FedAvg(fraction_evaluate=...). ReBasinFedAvg also takes
    # the model (its permutation spec is traced from it); an example input lets the tracer
    # see that `x.view(-1, 16 * 4 * 4)` flattens the conv features.
    strategy = ReBasinFedAvg(
        fraction_evaluate=context.run_config["fraction-evaluate"],
        model=global_model,
        example_input=torch.zeros(1, 1, 28, 28),
    )

    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
    )

    print("\nSaving final model to disk...")
    state_dict = result.arrays.to_torch_state_dict()
    torch.save(state_dict, context.run_config["final-model-path"])
