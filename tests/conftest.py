import os
from pathlib import Path

import pytest
import torch

# Real data for tests: $LMSTACK_TEST_DATA, else ../shared/data beside the checkout (the README's data section).
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_DATA = Path(os.environ["LMSTACK_TEST_DATA"]) if os.environ.get("LMSTACK_TEST_DATA") else DEFAULT_DATA
NO_DATA = (f"test data not found at {SHARED_DATA}: set LMSTACK_TEST_DATA=/path/to/data (a directory with "
           "tinyshakespeare/, gutenberg_nltk/, gsm8k/, ...) to run these tests")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    # pyproject.toml's addopts deselects `slow` tests; --runslow (or an explicit -m) brings them back.
    if config.getoption("--runslow"):
        config.option.markexpr = ""


def pytest_terminal_summary(terminalreporter):
    """Say once, in the summary, why the data-dependent tests skipped (the -rs list is off by default)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if NO_DATA in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} tests skipped: {NO_DATA}", yellow=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# The models in these directories are tiny: a second intra-op thread gains nothing, and on a machine shared with
# other jobs OpenMP's spin-waits make two threads several times slower than one.
ONE_THREAD_DIRS = {"align", "eval", "generate", "quant", "serve", "train"}


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    threads = torch.get_num_threads()
    if request.path.parent.name in ONE_THREAD_DIRS:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(NO_DATA)
    return SHARED_DATA


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
