"""The documentation stays true: every Python example in the README and ``docs/`` runs as written,
every file, module, entry point and config it names exists, the README's test command is the one
CI runs, no page carries issue numbers, no file of the repository points outside it, and
``docs/mora.md`` (the project's own account of the math) covers every MoRA type with tables that
agree with the code."""

from __future__ import annotations

import importlib
import itertools
import os
import pathlib
import re
import subprocess
import tempfile

import jax
import numpy as np
import pytest

from mora_jax import ops
from mora_jax.hf.peft_files import peft_config_dict
from mora_jax.methods import LoRAConfig, MoRAConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "mora.md"
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
# Pages written on other branches, linked from the README before they land; checked once they exist.
PAGES_TO_COME: set[str] = set()
README_MAX_LINES = 230
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


# ---------------------------------------------------------------------------------------------
# README and docs/: examples run, names exist, no issue numbers
# ---------------------------------------------------------------------------------------------


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(language: str) -> list[tuple[pathlib.Path, int, str]]:
    """``(page, first line, code)`` of every fenced ``language`` block of the pages."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in re.finditer(rf"^( *)```{language}\n(.*?)^\1```", text, flags=re.S | re.M):
            code = "\n".join(line[len(m.group(1)):] for line in m.group(2).splitlines())
            found.append((page, text.count("\n", 0, m.start()) + 2, code))
    return found


PYTHON_BLOCKS = _blocks("python")


def _check_readme_api(ns):
    assert ns["y"].shape == (4, 8)
    # after one step the adapters moved and the merged model equals the adapted one
    adapted = ns["mj"].apply_model(ns["model"], ns["params"], ns["x"], adapters=ns["adapters"])
    merged = ns["model"].apply({"params": ns["merged"]}, ns["x"])
    np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5)


def _check_api_transforms(ns):
    assert ns["y"].shape == (4, 8)
    merged = ns["model"].apply({"params": ns["merged"]}, ns["x"])
    np.testing.assert_allclose(merged, ns["y"], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(ns["restored"]), jax.tree_util.tree_leaves(ns["params"])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _check_assembly(ns):
    assert np.isfinite(float(ns["metrics"]["loss"])) and int(ns["state"].step) == 1


def _check_hf(ns):
    out = pathlib.Path(ns["out"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    assert (out / "merged" / "config.json").is_file()
    assert isinstance(ns["config"], ns["mj"].MoRAConfig) and ns["config"].mora_type == 6
    kernel = ns["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(kernel.sharding, jax.sharding.NamedSharding) and kernel.sharding.mesh.size == 8


def _check_generation(ns):
    new_tokens, model = ns["new_tokens"], ns["model"]
    assert new_tokens.shape == (2, 8) and model.config.rope_scaling.rope_type == "llama3"
    assert model.config.tie_word_embeddings and "lm_head" not in ns["params"]


def _check_nnx(ns):
    from flax import nnx

    import mora_jax as mj
    import mora_jax.nnx as mnx

    assert ns["losses"][-1] < ns["losses"][0]
    model, optimizer = ns["model"], ns["optimizer"]
    assert isinstance(model.layers[0].q_proj.kernel_mora_m, mnx.MoRAParam) and not mnx.is_merged(model)
    n_m = mj.count_params(nnx.state(model, mnx.MoRAParam))
    assert n_m == 4 * 16 * 16  # r̂ = 16 for r = 4 on 32 x 32 kernels
    assert mj.count_params(nnx.state(optimizer, nnx.optimizer.OptState)) == 2 + 2 * n_m  # state for M only
    assert set(mj.adapters.flatten(ns["adapters"])) == {
        ("layers_0", "q_proj", "kernel"), ("layers_0", "down_proj", "kernel"),
        ("layers_1", "q_proj", "kernel"), ("layers_1", "down_proj", "kernel")}


def _check_nnx_quantized(ns):
    import mora_jax.nnx as mnx
    from mora_jax.quant import formats

    layer = ns["model"].model.layers[0].mlp.up_proj
    assert isinstance(layer, mnx.QuantizedLinear) and formats.is_quantized(layer.kernel.get_value())
    assert layer.kernel_mora_m.shape[0] == layer.mora_spec.r_hat  # MoRA attached on the quantized layer


# What each example must have computed, besides running: (markers that identify it, check).
EXAMPLE_CHECKS = (
    (("class MLP", "mj.partition"), _check_readme_api),
    (("class MLP", "mj.unmerge"), _check_api_transforms),
    (("assembly.assemble",), _check_assembly),
    (("hf.save_adapter", "param_sharding_fn"), _check_hf),
    (("mj.generate(",), _check_generation),
    (("mnx.attach", "losses"), _check_nnx),
    (("mnx.quantize",), _check_nnx_quantized),
)


@pytest.mark.parametrize("page, line, code", PYTHON_BLOCKS,
                         ids=[f"{_rel(p)}:{n}" for p, n, _ in PYTHON_BLOCKS])
def test_every_python_example_runs(page, line, code, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # examples' mkdtemp() lands in tmp_path
    monkeypatch.chdir(ROOT)
    if '"model.gguf"' in code:  # the GGUF examples read a file of that name: a tiny one, written here
        import tiny_gguf

        tiny_gguf.write(tmp_path / "model.gguf")
        monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    exec(compile("\n" * (line - 1) + code, _rel(page), "exec"), namespace)
    for markers, check in EXAMPLE_CHECKS:
        if all(m in code for m in markers):
            check(namespace)


def test_the_key_examples_are_in_the_docs():
    for markers, check in EXAMPLE_CHECKS:
        assert any(all(m in code for m in markers) for _, _, code in PYTHON_BLOCKS), check.__name__


def _code_spans(text: str) -> list[str]:
    """Inline code and the lines of fenced blocks."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    rest = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    return fenced + re.findall(r"`([^`\n]+)`", rest)


_REPO_PATH = re.compile(r"(?<![\w./-])((?:mora_jax|tests|configs|benchmarks|results|train|docs|\.ci)/[\w./{},*-]*[\w}])")


def _expand(path: str) -> list[str]:
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    return list(itertools.chain.from_iterable(
        _expand(path[:m.start()] + alt + path[m.end():]) for alt in m.group(1).split(",")))


def test_every_file_the_docs_name_exists():
    missing = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        named = set()
        for span in _code_spans(text):
            named |= {p.split("::")[0] for p in _REPO_PATH.findall(span)}
        for link in re.findall(r"\]\(([^)#\s]+)", text):  # markdown links and images
            if not re.match(r"[a-z]+:", link):
                named.add(_rel((page.parent / link).resolve()))
        for name in named:
            if "*" in name or name.startswith(("runs/", "data/")):
                continue
            for path in _expand(name):
                if not (ROOT / path).exists() and path not in PAGES_TO_COME:
                    missing.append(f"{_rel(page)}: {path}")
    assert missing == []


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_module_and_name_the_docs_name_exists():
    dotted = set()
    for page in PAGES:
        for span in _code_spans(page.read_text(encoding="utf-8")):
            dotted |= set(re.findall(r"\b(mora_jax(?:\.\w+)+)", span))
    assert sorted(d for d in dotted if not _resolves(d)) == []


def test_every_command_names_an_entry_point_and_config_that_exist():
    problems = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for span in _code_spans(text):
            for module in re.findall(r"python -m (train\.\w+)", span):
                if not (ROOT / (module.replace(".", "/") + ".py")).is_file():
                    problems.append(f"{_rel(page)}: {module}")
            for file, variant in re.findall(r"--config[= ](configs/\w+\.py)(?::(\w+))?", span):
                if not (ROOT / file).is_file():
                    problems.append(f"{_rel(page)}: {file}")
                    continue
                module = importlib.import_module(file[:-3].replace("/", "."))
                try:
                    module.get_config(variant) if variant else module.get_config()
                except ValueError as e:
                    problems.append(f"{_rel(page)}: {file}:{variant}: {e}")
    assert problems == []


def test_no_page_carries_issue_numbers():
    offenders = []
    for page in PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\bissues?\b|#\d", line, flags=re.I):
                offenders.append(f"{_rel(page)}:{n}: {line.strip()}")
    assert offenders == []


def test_ci_runs_the_readme_test_command():
    setup = README.read_text(encoding="utf-8").split("## Set up", 1)[1]
    command = re.search(r"python -m pytest [^\n]*", setup).group(0)
    assert command == 'python -m pytest -q -n 2 --timeout=900 -m "not slow"'
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert command in ci.splitlines()


def test_readme_maps_every_module():
    """A new module or folder gets a line in the README's map of the code."""
    code_map = README.read_text(encoding="utf-8").split("## Map of the code", 1)[1].split("\n## ", 1)[0]
    package = ROOT / "mora_jax"
    names = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    names += [f"mora_jax/{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()]
    names += ["train/", "configs/", "docs/", "tests/", "benchmarks/", "results/"]
    assert sorted(n for n in names if n not in code_map) == []


def test_readme_stays_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail into a page under docs/"
