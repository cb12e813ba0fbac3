"""pytest configuration of the interoperability tier.

Runs before any test module is imported, so the environment below is in place before torch,
transformers, peft or diffusers are imported: no hub access, no telemetry, one thread.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["DISABLE_TELEMETRY"] = "1"  # diffusers
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import diffusers  # noqa: E402

import interop  # noqa: E402  (Tests/Interop/interop.py: paths, the CLI runner, shared helpers)


torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores
transformers.utils.logging.disable_progress_bar()
diffusers.utils.logging.disable_progress_bar()


def pytest_report_header(config):
    return f"adapter binary: {interop.ADAPTER_BIN}"


@pytest.fixture(scope="session", autouse=True)
def _adapter_binary_present():
    if not interop.ADAPTER_BIN.is_file() or not os.access(interop.ADAPTER_BIN, os.X_OK):
        pytest.exit(f"no executable adapter binary at {interop.ADAPTER_BIN}: run `swift build -c release` "
                    f"or set ADAPTER_BIN", returncode=1)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """One session-wide scratch folder for outputs shared between tests (merges, models)."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="session")
def f32_llama_dir(workdir):
    """A transformers model folder: tiny-llama's config and tokenizer + the F32 weights, one file."""
    return interop.make_f32_llama_folder(workdir / "tiny-llama-f32")


@pytest.fixture(scope="session")
def merged(workdir, f32_llama_dir):
    """`merged(adapter)`: our merge of ADAPTER into the F32 llama folder (cached per adapter)."""
    cache = {}

    def get(adapter):
        adapter = str(adapter)
        if adapter not in cache:
            out = workdir / f"merged-{len(cache)}"
            interop.adapter("merge", "--quiet", f32_llama_dir, adapter, out)
            cache[adapter] = out
        return cache[adapter]

    return get
