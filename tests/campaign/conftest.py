import pytest


@pytest.fixture(scope="session")
def mlp_checkpoint(tmp_path_factory):
    """A small digits model trained for one epoch, saved as a checkpoint folder."""
    from flipsafe.train import TrainConfig
    from flipsafe.workflow import train_classifier

    out = tmp_path_factory.mktemp("models") / "mlp"
    train_classifier("digits", arch="mlp", head="linear", out=out,
                     config=TrainConfig(epochs=2), show_progress=False)
    return out
