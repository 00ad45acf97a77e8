"""Entry point: a run's own train step against variants of its config, side by side (mora_jax.bench.variants).

    python -m train.step_variants --config=configs/math_finetune.py:chat --config.model.hf_path=DIR \\
        --config.data.source=train.jsonl --config.train.batch_size=8 --config.train.seq_len=64 \\
        --variant "f32: model.dtype=float32 model.param_dtype=float32" \\
        --variant "f32 accum1: model.dtype=float32 model.param_dtype=float32 train.grad_accum=1" \\
        --out benchmarks/cpu_smollm2_finetune_variants.json

The first row is the run as given; each ``--variant "NAME: field=value ..."`` changes fields of it
(dotted names as with ``--config.``, values as Python literals). Writes ``--out`` (JSON) and a
markdown table beside it (``.md``).
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from mora_jax import logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "run configuration (configs/*.py[:variant])")
_VARIANTS = flags.DEFINE_multi_string("variant", [], 'a variant of the run: "NAME: field=value field=value"')
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per variant (interleaved round-robin)")
_WARMUP = flags.DEFINE_integer("warmup", 1, "untimed steps per variant")
_TASK = flags.DEFINE_enum("task", "finetune", ["finetune", "pretrain"], "the data pipeline of the run")
_OUT = flags.DEFINE_string("out", "", "JSON file to write (and a .md beside it)")


def main(argv):
    del argv
    logs.apply_verbosity_flag()  # other libraries' INFO lines only with --verbosity
    from mora_jax.bench import report, variants
    from mora_jax.experiments.provenance import provenance

    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/math_finetune.py:chat")
    try:  # every variant parsed and checked before anything compiles
        chosen = [variants.Variant("run")] + [variants.Variant.parse(v) for v in _VARIANTS.value]
        runs = variants.variant_runs(_CONFIG.value, chosen)
    except ValueError as e:
        sys.exit(f"error: {e}")
    result = variants.run_variants(runs, steps=_STEPS.value, warmup=_WARMUP.value, task=_TASK.value)
    text = variants.variants_markdown(result)
    print(text)
    if _OUT.value:
        out = pathlib.Path(_OUT.value)
        report.write_json({**result, "command": " ".join(["python -m train.step_variants", *sys.argv[1:]]),
                           "provenance": provenance()}, out)
        out.with_suffix(".md").write_text(text + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    app.run(main)
