"""Real data: two MLPs 3x512 trained apart on a biased US/EU split of MNIST, then merged.

Model A gets 20 % of digits 0-4 and 80 % of digits 5-9 (the "eu" region), model B the rest
(the "us" region); the shards are disjoint. The re-basin midpoint must be about as accurate
as the better of the two and have a lower test loss than naive averaging.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rebasin.data import load_dataset
from rebasin.matching import weight_matching
from rebasin.merge import interpolate
from rebasin.models import MLP
from rebasin.partition import region_split
from rebasin.permute import apply_permutation
from rebasin.train import evaluate, train

EPOCHS = 2


@pytest.mark.timeout(400)
def test_rebasin_midpoint_beats_naive_average_on_us_eu_mnist(data_dir) -> None:
    train_set = load_dataset("mnist", train=True, data_dir=data_dir)
    test_loader = load_dataset("mnist", train=False, data_dir=data_dir).loader(1000)
    us, eu = region_split(train_set.labels, num_regions=2, own_fraction=0.8, seed=0)
    assert not np.intersect1d(us, eu).size and len(us) + len(eu) == 60000
    labels_eu = train_set.labels[eu]
    share_low = float((labels_eu < 5).sum()) / float((train_set.labels < 5).sum())
    assert share_low == pytest.approx(0.2, abs=1e-3)  # A: 20 % of digits 0-4, 80 % of 5-9

    models = []
    for init_seed, shard in ((1, eu), (2, us)):  # A, B: different initialisations
        torch.manual_seed(init_seed)
        model = MLP()
        loader = train_set.subset(shard).loader(128, shuffle=True, seed=init_seed)
        train(model, loader, epochs=EPOCHS, lr=0.05, weight_decay=5e-4)
        models.append(model)
    a, b = (m.state_dict() for m in models)
    spec = models[0].permutation_spec()

    def score(state_dict):
        model = copy.deepcopy(models[0])
        model.load_state_dict(state_dict)
        return evaluate(model, test_loader)

    acc_a, acc_b = score(a).accuracy, score(b).accuracy
    naive = score(interpolate(a, b, 0.5))
    b_aligned = apply_permutation(spec, weight_matching(spec, a, b, seed=0).perms, b)
    rebasin = score(interpolate(a, b_aligned, 0.5))

    assert min(acc_a, acc_b) > 0.9  # both endpoints really learned
    assert rebasin.accuracy >= max(acc_a, acc_b) - 0.005, (acc_a, acc_b, rebasin, naive)
    assert rebasin.loss < naive.loss, (rebasin, naive)
