"""The README's API example runs as written (the README stays true)."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "mj.init_adapters" in b and "class MLP" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (4, 8)
    # after one step the adapters moved and the merged model equals the adapted one
    adapted = namespace["mj"].apply_model(namespace["model"], namespace["params"], namespace["x"],
                                          adapters=namespace["adapters"])
    merged = namespace["model"].apply({"params": namespace["merged"]}, namespace["x"])
    np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5)
