import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from lol.allocator import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as the `lol` commands do (`lol.allocator`); the test subprocesses inherit it


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def ci_zoo(tmp_path_factory):
    """The zoo's ci preset (tiny real SD / CLIP / LM bases and the faces, fashion and lm collections), built once per
    test session with the real CLI; LOL_CI_ZOO=DIR reuses (or fills) an existing ci build."""
    import subprocess
    import sys
    from pathlib import Path

    given = os.environ.get("LOL_CI_ZOO")
    out = Path(given) if given else tmp_path_factory.mktemp("zoo_ci")
    if not all((out / "collections" / c / "collection.json").is_file() for c in ("faces", "fashion", "lm")):
        subprocess.run([sys.executable, "-m", "lol", "zoo", "build", "--preset", "ci", "--out", str(out),
                        "--no-progress"], check=True, cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, timeout=900)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a shared, oversubscribed CPU.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
