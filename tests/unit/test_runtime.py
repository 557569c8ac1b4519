import pytest
import torch

from deepspec.runtime import bulk_compute_threads, intra_op_threads


def test_thread_count_from_environment(monkeypatch):
    monkeypatch.setenv("DEEPSPEC_NUM_THREADS", "3")
    assert intra_op_threads() == 3


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_invalid_thread_count_rejected(monkeypatch, value):
    monkeypatch.setenv("DEEPSPEC_NUM_THREADS", value)
    with pytest.raises(ValueError, match="DEEPSPEC_NUM_THREADS"):
        intra_op_threads()


def test_torchrun_thread_setting_left_alone(monkeypatch):
    monkeypatch.delenv("DEEPSPEC_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert intra_op_threads() is None


def test_default_is_half_the_cpus(monkeypatch):
    monkeypatch.delenv("DEEPSPEC_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert intra_op_threads() == 4
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert intra_op_threads() == 1


def test_bulk_threads_restored_after_block(monkeypatch):
    monkeypatch.delenv("DEEPSPEC_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    previous = torch.get_num_threads()
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    with bulk_compute_threads():
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == previous


def test_bulk_threads_respect_explicit_setting(monkeypatch):
    monkeypatch.setenv("DEEPSPEC_NUM_THREADS", "1")
    previous = torch.get_num_threads()
    with bulk_compute_threads():
        assert torch.get_num_threads() == previous
