"""Training on a synthetic task: the loss covers only the scored positions, the run is
reproducible from its seed, and it learns."""

import pytest
import torch

from evals.mqar import IGNORE, MQARConfig, mqar_batch
from evals.task_train import TaskTrainConfig, masked_loss, scored_loss, task_accuracy, train_on_task
from evals.transformer import Transformer, TransformerConfig
from models.config import ModelConfig
from models.model import MCModel

TASK = MQARConfig(vocab_size=32, seq_len=32, num_pairs=4)


def sample(generator):
    return mqar_batch(TASK, 16, generator)


def fresh_model():
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=32, d_model=32, n_heads=2, mlp_hidden=64))


def test_masked_loss_ignores_unscored_positions():
    logits = torch.randn(2, 5, 7)
    targets = torch.full((2, 5), IGNORE)
    targets[0, 3], targets[1, 1] = 4, 2
    expected = torch.nn.functional.cross_entropy(torch.stack([logits[0, 3], logits[1, 1]]), torch.tensor([4, 2]))
    assert torch.allclose(masked_loss(logits, targets), expected)


@pytest.mark.parametrize("make", [fresh_model, lambda: MCModel(ModelConfig(
    vocab_size=32, d_model=32, n_layers=2, n_heads=2, dk=16, dv=16, mlp_hidden=64, memory="delta",
    aggregation="grm", segment_size=8))])
def test_scored_loss_projects_only_the_scored_positions_and_equals_the_masked_loss(make):
    model = make()
    inputs, targets = sample(torch.Generator().manual_seed(1))
    full = masked_loss(model(inputs), targets)
    fast = scored_loss(model, inputs, targets)
    assert torch.allclose(fast, full, atol=1e-5)
    fast.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_training_is_reproducible_and_lowers_the_loss():
    cfg = TaskTrainConfig(steps=40, lr=3e-3, warmup=5)
    first, second = train_on_task(fresh_model(), sample, cfg, torch.device("cpu")), \
        train_on_task(fresh_model(), sample, cfg, torch.device("cpu"))
    assert first.losses == second.losses and first.steps == 40
    assert sum(first.losses[-10:]) / 10 < sum(first.losses[:10]) / 10 - 0.5
    model = fresh_model()
    train_on_task(model, sample, cfg, torch.device("cpu"))
    assert not model.training and 0.0 <= task_accuracy(model, sample, torch.device("cpu"), batches=2) <= 1.0


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(lr=0.0), dict(warmup=-1), dict(grad_clip=0.0)])
def test_bad_train_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        TaskTrainConfig(**kwargs)
