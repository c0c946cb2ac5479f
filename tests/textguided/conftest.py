"""Shared fixtures for the text-guided tests: the bundled MiniLM, loaded once."""

import pytest


@pytest.fixture(scope="session")
def minilm():
    from flipsafe.textguided import get_encoder

    return get_encoder("minilm")
