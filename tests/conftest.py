"""Shared fixtures: the bundled checkpoints, resolved once per session, and tiny real checkpoints.

Nothing here touches the network: the hub is forced offline before transformers is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# OpenMP threads (torch's and the C kernels') sleep when idle instead of spinning. On 2 cores the test
# process is never alone (the engine thread beside the test's own thread, a server process, the other
# worker of a parallel region): spinning threads take the core the thread they wait for needs, and the
# tiny-model exactness cases ran 3-7x slower for it (44 s passive against 160-340 s here). Thread counts
# and code paths stay as they are. Read once, when libgomp loads: before anything imports torch (server
# processes the tests start inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lmserve.checkpoints import resolve_model  # noqa: E402

# Tiny models share the SmolLM2 tokenizer, so their vocab must match it.
SMOLLM2_VOCAB_SIZE = 49152
# Std of the random init: large enough that logits are far from uniform (top prob ~0.1), so greedy
# outputs depend on the prompt; small enough that float32 stays well conditioned.
TINY_INIT_STD = 0.5


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kernel-sanitizers", action="store_true",
        help="the C kernel tests load the AddressSanitizer/UBSan builds (make kernels-asan preloads libasan)",
    )  # fmt: skip


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The real model cache (not a temp dir): GGUF conversion is deterministic and takes ~20 s, so
    sharing it across runs and with the CLI keeps the suite fast. LMSERVE_TEST_CACHE_DIR overrides."""
    path = Path(os.environ.get("LMSERVE_TEST_CACHE_DIR") or Path.home() / ".cache" / "lmserve")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(cache_dir: Path) -> Path:
    return resolve_model("smollm2-135m-instruct", cache_dir).path


@pytest.fixture(scope="session")
def minilm_dir(cache_dir: Path) -> Path:
    return resolve_model("all-minilm-l6-v2", cache_dir).path


def _build_tiny(dest: Path, config, smollm2_dir: Path) -> Path:
    """Save a seeded random model with the SmolLM2 tokenizer as a real float32 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # keep norms near 1 but not exactly, so their weights matter too
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:  # includes Qwen2's q/k/v biases, which from_config would leave at zero
                param.normal_(0.0, TINY_INIT_STD)
    model.save_pretrained(str(dest))
    AutoTokenizer.from_pretrained(str(smollm2_dir)).save_pretrained(str(dest))
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(str(dest))
    return dest


_TINY_DIMS = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    intermediate_size=128,
    vocab_size=SMOLLM2_VOCAB_SIZE,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=2, tie_word_embeddings=False, **_TINY_DIMS)
    return _build_tiny(tmp_path_factory.mktemp("tiny_llama"), config, smollm2_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    from transformers import Qwen2Config

    config = Qwen2Config(num_hidden_layers=3, tie_word_embeddings=True, **_TINY_DIMS)
    return _build_tiny(tmp_path_factory.mktemp("tiny_qwen2"), config, smollm2_dir)
