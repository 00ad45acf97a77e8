"""The documentation is self-contained: no file of the repository points outside it, and
``docs/mora.md`` (the project's own account of the math) exists, covers every MoRA type, and its
tables agree with the code."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

import pytest

from mora_jax import ops
from mora_jax.hf.peft_files import peft_config_dict
from mora_jax.methods import LoRAConfig, MoRAConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "mora.md"
# Written in two pieces so that this file does not match itself.
OUTSIDE_REFERENCES = ("MORA" + "_SPEC", "../" + "shared")
_SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", "build", "dist", "node_modules"}


def _repository_files() -> list[pathlib.Path]:
    """Tracked files plus untracked ones git does not ignore; without git, a walk of the tree."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True, timeout=60,
        ).stdout
        names = [n for n in out.decode("utf-8", "surrogateescape").split("\0") if n]
        return [ROOT / n for n in names if (ROOT / n).is_file()]
    except (OSError, subprocess.SubprocessError):
        files = []
        for directory, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            files += [pathlib.Path(directory) / n for n in names]
        return files


def test_no_file_refers_outside_the_repository():
    files = _repository_files()
    assert DOC in files
    offenders = []
    for path in files:
        data = path.read_bytes()
        for needle in OUTSIDE_REFERENCES:
            if needle.encode() in data:
                offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert offenders == [], "point to docs/mora.md instead"


@pytest.fixture(scope="module")
def doc() -> str:
    assert DOC.is_file(), "docs/mora.md is missing"
    return DOC.read_text(encoding="utf-8")


def test_doc_covers_every_type(doc):
    types_table = doc[doc.index("### The five types") :]
    for mora_type in ops.MORA_TYPES:
        assert re.search(rf"^\| {mora_type} \|", types_table, flags=re.M), f"type {mora_type} has no row"
    for topic in ("r̂", "wrap", "ΔK", "merge", "unmerge", "float32", "ReMoRA", "1 → 2 → 3 → 4", "rsLoRA",
                  "lora_scale", '"reference"', '"cosine_restarts"', "adapter_config.json",
                  "adapter_model.safetensors", "lora_A.weight", "lora_B.weight", "use_mora", "mora_type"):
        assert topic in doc, topic


def test_doc_rank_hat_table_matches_the_code(doc):
    rows = re.findall(r"^\| (\d+) → (\d+)(?: \(and \d+ → \d+\))? \| (\d+) \| (\d+) \| (\d+) \|$", doc, flags=re.M)
    assert len(rows) >= 4
    for k, d, r, r_hat, r_hat6 in (tuple(map(int, row)) for row in rows):
        assert ops.rank_hat(k, d, r, 1) == r_hat, (k, d, r)
        assert ops.rank_hat(k, d, r, 6) == r_hat6, (k, d, r)


def test_doc_lists_every_config_key_written(doc):
    keys = set(peft_config_dict(MoRAConfig(), ["q_proj"])) | set(peft_config_dict(LoRAConfig(), ["q_proj"]))
    missing = sorted(k for k in keys if f"`{k}" not in doc)
    assert missing == []
