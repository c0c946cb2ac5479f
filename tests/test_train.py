import pytest
import torch

from flipsafe import ConfigError, TrainingError, UnknownNameError
from flipsafe.train import TrainConfig, evaluate, train
from flipsafe.workflow import HeadSpec, build_classifier


@pytest.fixture(scope="module")
def digits():
    from flipsafe.data import load

    return load("digits")


def test_short_training_learns_digits(digits):
    model, _ = build_classifier("mlp", HeadSpec("linear"), "digits", digits.classes, 1, 8, seed=0)
    before = evaluate(model, digits.test)
    result = train(model, digits.train, digits.test, TrainConfig(epochs=3, lr=0.05), show_progress=False)
    assert before < 0.5
    assert result.accuracy > 0.85
    assert result.losses[-1] < result.losses[0]


def test_same_seed_same_model(digits):
    weights = []
    for _ in range(2):
        model, _ = build_classifier("mlp", HeadSpec("cosine"), "digits", digits.classes, 1, 8, seed=1)
        train(model, digits.train, None, TrainConfig(epochs=1, seed=1), show_progress=False)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_frozen_head_stays_fixed_while_backbone_learns(digits):
    model, _ = build_classifier(
        "mlp", HeadSpec("cosine"), "digits", digits.classes, 1, 8, seed=0, freeze_head=True
    )
    head = model.head.fc.weight.detach().clone()
    first = next(model.backbone.parameters()).detach().clone()
    train(model, digits.train, None, TrainConfig(epochs=1), show_progress=False)
    assert torch.equal(model.head.fc.weight, head)
    assert not torch.equal(next(model.backbone.parameters()), first)


def test_bad_recipe_values():
    with pytest.raises(UnknownNameError, match="adamw"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ConfigError):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="text:minilm"):
        HeadSpec.parse("texty")


@pytest.mark.parametrize("changes, needle", [
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"lr": 0.0}, "lr must be greater than 0"),
    ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
    ({"weight_decay": float("nan")}, "weight_decay must be a finite number"),
    ({"label_smoothing": 1.0}, "label_smoothing must be in"),
    ({"label_smoothing": float("nan")}, "label_smoothing must be a finite number"),
    ({"momentum": 1.5}, "momentum must be in"),
    ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
    ({"epochs": 2.5}, "epochs must be a whole number"),
    ({"warmup_epochs": -1}, "warmup_epochs must be a whole number >= 0"),
])
def test_impossible_recipe_values_are_refused(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**changes)


def test_diverging_training_stops_with_an_error(digits):
    model, _ = build_classifier("mlp", HeadSpec.parse("linear"), "digits", digits.classes, 1, 8)
    with pytest.raises(TrainingError, match="training diverged: the loss became nan"):
        train(model, digits.train, None, TrainConfig(epochs=1, lr=1e30), show_progress=False)
