"""The trained clients of a one-shot run, kept on disk beside its results.

A CIFAR-10 seed trains its clients one after another for most of an hour each on a CPU, so
an interrupted seed should not lose the clients it finished. ``rebasin simulate`` writes
each trained client to ``<out>/clients/seed<S>-client<I>.safetensors`` (atomically) and, with
``--resume``, loads the ones it finds instead of training them again. A file is only taken
for the very client it was made for: its metadata holds the experiment's settings, the seed,
the client and the training this machine resolves (bf16 or not), and any difference is an
error naming the file. The files also carry the model identity that ``rebasin merge`` reads,
so the trained endpoints can be merged offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from rebasin.recipe import training_identity
from simulations.oneshot import OneShotConfig, training_of
from simulations.results import differing_settings

CLIENT_FORMAT = "rebasin-fl-client/1"
CLIENTS_DIR = "clients"
# Settings that only the merges read: a stored client stays valid when they change.
_MERGE_ONLY = ("centralized", "repair_batches", "lambdas", "max_iter")


class ClientStoreError(ValueError):
    """A stored client cannot be used for the client it would stand for."""


@dataclass(frozen=True)
class ClientStore:
    """Where the trained clients of one run live, and whether stored ones are reused.

    Attributes
    ----------
    directory
        The folder of the ``seed<S>-client<I>.safetensors`` files (created on first write).
    reuse
        Load a stored client instead of training it (``--resume``); else every client is
        trained and its file overwritten.
    """

    directory: Path
    reuse: bool = False

    def path(self, seed: int, client: int) -> Path:
        """The file of client ``client`` of seed ``seed``."""
        return self.directory / f"seed{seed}-client{client}.safetensors"

    def load(self, cfg: OneShotConfig, seed: int, client: int, model: nn.Module) -> float | None:
        """Load the stored client into ``model`` and return its training seconds; ``None``
        (``model`` untouched) when reuse is off or there is no file.

        Raises
        ------
        ClientStoreError
            Naming the file: unreadable (corrupt, truncated, another format), made for other
            settings, seed, client or training, or tensors that do not fit ``model``.
        """
        path = self.path(seed, client)
        if not (self.reuse and path.is_file()):
            return None
        from simulations.merge_io import MergeInputError, read_metadata, read_state_dict

        try:
            metadata = read_metadata(path)
        except MergeInputError as exc:
            raise ClientStoreError(f"cannot reuse stored client {path}: {exc}") from None
        raw = metadata.get("client", "") if metadata.get("format") == CLIENT_FORMAT else ""
        try:
            stored, seconds = json.loads(raw), float(metadata["train_seconds"])
        except (KeyError, ValueError):
            stored = None
        if not isinstance(stored, dict):
            raise ClientStoreError(f"{path}: not a stored client ({CLIENT_FORMAT})")
        differ = differing_settings(stored, client_key(cfg, seed, client))
        if differ:
            raise ClientStoreError(
                f"{path} was trained otherwise than this run's seed {seed} client {client} "
                f"({', '.join(differ)} differ); delete it or use another --out"
            )
        try:
            state_dict = read_state_dict(path, model.state_dict())
        except MergeInputError as exc:
            raise ClientStoreError(f"cannot reuse stored client {path}: {exc}") from None
        model.load_state_dict(state_dict)
        model.eval()  # as training leaves it
        return seconds

    def save(
        self, cfg: OneShotConfig, seed: int, client: int, model: nn.Module, seconds: float
    ) -> Path:
        """Write trained ``model`` as client ``client`` of seed ``seed``; return the path."""
        from server.checkpoint import write_safetensors
        from server.identity import ModelIdentity

        identity = ModelIdentity(cfg.model, cfg.dataset, cfg.width, cfg.norm)
        metadata = {
            "format": CLIENT_FORMAT,
            "client": json.dumps(client_key(cfg, seed, client), sort_keys=True),
            "train_seconds": repr(float(seconds)),
            **identity.to_metadata(),
        }
        path = self.path(seed, client)
        write_safetensors(path, model.state_dict(), metadata)
        return path


def client_key(cfg: OneShotConfig, seed: int, client: int) -> dict:
    """What makes a trained client this one: the training settings, the seed, the client and
    the training this machine resolves for them (plain JSON)."""
    settings = cfg.model_dump(mode="json")
    for name in _MERGE_ONLY:
        settings.pop(name)
    training = training_identity(training_of(cfg))
    return {"settings": settings, "seed": seed, "client": client, "training": training}
