"""Shared fixture: the softmax-regression problem of reference.py, built once per session."""
import pytest

from .reference import Problem, make_problem


@pytest.fixture(scope="session")
def problem() -> Problem:
    return make_problem()
