"""Test set-up: CPU only, 8 fake devices (for the sharding tests), fixtures path, shared data fixtures."""

import os
import pathlib

# Must happen before JAX is imported anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# The suite runs tiny programs: cheap compiles matter more than fast code (about halves its time).
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = _flags.strip()

import pytest  # noqa: E402

from mora_jax import data as data_lib

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


@pytest.fixture(scope="session")
def math_data(tmp_path_factory) -> pathlib.Path:
    """Synthetic math records (train: 200, eval: 20) and a 512-token SentencePiece model trained on
    synthetic prose: ``math_train.jsonl``, ``math_eval.jsonl``, ``tok.model``."""
    d = tmp_path_factory.mktemp("math")
    data_lib.write_synthetic_corpus(d / "corpus.txt", 800, seed=0)
    data_lib.write_synthetic_math(d / "math_train.jsonl", 200, seed=0)
    data_lib.write_synthetic_math(d / "math_eval.jsonl", 20, seed=1)
    data_lib.train_tokenizer(str(d / "corpus.txt"), str(d / "tok"), vocab_size=512)
    return d
