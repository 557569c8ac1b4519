import pytest

from deepspec.config import TrainConfig
from deepspec.train.data import StepSampler
from deepspec.train.optim import lr_factor


def test_step_batches_independent_of_world_size():
    sampler = StepSampler(num_samples=37, global_batch_size=8, seed=3)
    for step in range(10):
        single = [i for batch in sampler.rank_micro_batches(step, 0, 1, 4) for i in batch]
        pair = [i for rank in range(2) for batch in sampler.rank_micro_batches(step, rank, 2, 2) for i in batch]
        assert sorted(single) == sorted(pair)
        assert len(set(single)) == 8


def test_epoch_covers_each_sample_at_most_once():
    sampler = StepSampler(num_samples=20, global_batch_size=6, seed=0)
    assert sampler.steps_per_epoch == 3
    seen = [i for step in range(3) for i in sampler.global_batch(step)]
    assert len(seen) == len(set(seen)) == 18


def test_resumed_sampler_replays_the_same_batches():
    first = StepSampler(num_samples=50, global_batch_size=8, seed=1)
    expected = [first.global_batch(step) for step in range(12)]
    resumed = StepSampler(num_samples=50, global_batch_size=8, seed=1)
    assert [resumed.global_batch(step) for step in range(7, 12)] == expected[7:]


def test_too_few_samples_rejected():
    with pytest.raises(ValueError, match="fewer than train.global_batch_size=8"):
        StepSampler(num_samples=5, global_batch_size=8, seed=0)


def test_warmup_then_cosine_to_floor():
    settings = TrainConfig(max_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert lr_factor(1, settings) == pytest.approx(0.1)
    assert lr_factor(10, settings) == pytest.approx(1.0)
    assert lr_factor(55, settings) == pytest.approx(0.55)
    assert lr_factor(100, settings) == pytest.approx(0.1)
