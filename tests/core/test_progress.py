"""Progress bars: rate and ETA on a terminal, nothing when the output is not one."""

from __future__ import annotations

import io

import pytest
from twinkle.progress import QuietBar, enabled, library_bars, progress


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _no_forcing(monkeypatch):
    monkeypatch.delenv("TWINKLE_PROGRESS", raising=False)


def test_not_a_tty_is_quiet():
    stream = io.StringIO()  # a pipe or a log file: isatty() is False
    bar = progress(range(5), desc="encode", unit="row", file=stream)
    assert isinstance(bar, QuietBar)
    assert list(bar) == [0, 1, 2, 3, 4] and bar.n == 5
    bar.set_postfix(loss="1.0")
    bar.close()
    assert stream.getvalue() == ""


def test_a_tty_gets_a_bar_with_rate_and_eta():
    stream = FakeTTY()
    bar = progress(range(50), desc="sft", unit="batch", file=stream, mininterval=0, miniters=1)
    assert not isinstance(bar, QuietBar)
    assert list(bar) == list(range(50))
    bar.close()
    text = stream.getvalue()
    assert "sft" in text and "50/50" in text
    assert "batch/s" in text or "s/batch" in text  # the rate
    assert "<" in text  # elapsed<remaining: the ETA


def test_env_forces_either_way(monkeypatch):
    monkeypatch.setenv("TWINKLE_PROGRESS", "0")
    assert not enabled(FakeTTY())
    monkeypatch.setenv("TWINKLE_PROGRESS", "1")
    assert enabled(io.StringIO())


def test_library_bars_follow_the_rule(monkeypatch):
    import datasets

    datasets.enable_progress_bars()
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    with library_bars():
        assert datasets.are_progress_bars_disabled()
    assert not datasets.are_progress_bars_disabled()  # restored
    monkeypatch.setattr("sys.stderr", FakeTTY())
    with library_bars():
        assert not datasets.are_progress_bars_disabled()


def test_dataset_encode_is_quiet_off_a_terminal(monkeypatch, capfd):
    from twinkle import assets
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.preprocessor import SelfCognitionProcessor

    dataset = Dataset(dataset_meta=DatasetMeta(str(assets.path("datasets/self_cognition.jsonl")), data_slice=range(8)))
    dataset.set_template("Template", model_id=str(assets.path("tiny-qwen2")))
    dataset.map(SelfCognitionProcessor("n", "a"), load_from_cache_file=False)
    dataset.encode(load_from_cache_file=False)
    err = capfd.readouterr().err
    assert "Encoding" not in err and "it/s" not in err and "examples/s" not in err
