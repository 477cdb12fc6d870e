"""seqrec.training.averaging: the exponential moving average of the weights, and its checkpoint."""

from __future__ import annotations

import pytest
import torch

from seqrec.training.averaging import WeightAverage
from seqrec.training.checkpoints import TrainingState, load_checkpoint, save_checkpoint


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    return model


def test_the_average_follows_the_warmed_up_decay_and_leaves_integer_buffers_alone():
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.9)
    expected = start["0.weight"].clone()
    for step in range(30):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model[1].num_batches_tracked += 1
        average.update(model)
        decay = min(0.9, (1 + step) / (10 + step))  # 0.1, 0.18, ... then 0.9
        expected = decay * expected + (1 - decay) * model[0].weight
    averaged = average.state_dict(model)
    torch.testing.assert_close(averaged["0.weight"], expected)
    assert (
        averaged["1.num_batches_tracked"].item() == 30
        and averaged["1.num_batches_tracked"].dtype == torch.long
    )
    # The average trails the weights by about decay / (1 - decay) steps of +1 (decay 0.76 at step 30).
    assert (start["0.weight"] + 20 < averaged["0.weight"]).all()
    assert (averaged["0.weight"] < model[0].weight - 2).all()


def test_swapped_in_validates_the_average_and_gives_the_weights_back():
    model = _model().eval()
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    own = model[0].weight.clone()
    x = torch.randn(4, 3)
    average.update(model)
    with average.swapped_in(model):
        torch.testing.assert_close(model[0].weight, average.state_dict(model)["0.weight"])
        assert not torch.equal(model[0].weight, own)
        inside = model(x)
    torch.testing.assert_close(model[0].weight, own)
    assert not torch.equal(model(x), inside)


def test_a_bad_decay_is_refused():
    with pytest.raises(ValueError, match="train.weight_average"):
        WeightAverage(_model(), decay=1.0)


def test_the_checkpoint_keeps_the_average_when_there_is_one(tmp_path):
    model = _model()
    average = WeightAverage(model, decay=0.9)
    average.update(model)
    weights = model.state_dict()
    state = TrainingState(epoch=0, best=0.1, best_epoch=0, average_updates=average.updates)
    for directory, kept in ((tmp_path / "with", average.average), (tmp_path / "without", None)):
        directory.mkdir()
        save_checkpoint(directory, state, weights=weights, best_weights=weights, optimizer={}, average=kept)
        saved = load_checkpoint(directory)
        assert saved.state.average_updates == 1
        if kept is None:
            assert saved.average is None
        else:
            assert saved.average.keys() == average.average.keys()
            torch.testing.assert_close(saved.average["0.weight"], average.average["0.weight"])
            resumed = WeightAverage(model, 0.9, updates=saved.state.average_updates, average=saved.average)
            with torch.no_grad():
                model[0].weight.add_(1.0)
            resumed.update(model)  # the restored average moves towards the model's current weights
            decay = min(0.9, 2 / 11)
            expected = decay * saved.average["0.weight"] + (1 - decay) * model[0].weight
            torch.testing.assert_close(resumed.average["0.weight"], expected)
