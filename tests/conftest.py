"""Fixtures for the whole suite."""
import pytest
import torch


@pytest.fixture(autouse=True)
def keep_threads():
    """fit(threads=N) sets the process-wide thread count: give it back after every test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
