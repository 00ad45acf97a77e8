"""Entry point: profile one method's training step, fusion by fusion (see mora_jax.bench.profile).

    python -m train.profile_step --config configs/bench_250m.py --config.model.overrides.num_hidden_layers=4 --method "mora1 r=8"
    python -m train.profile_step --config configs/bench_250m.py --method "lora r=8" --untuned --out lora.md

``--method`` is a benchmark label: "full", "lora r=<r>", "mora<type> r=<r>", "dora r=<r>", "pissa r=<r>", "hira r=<r>". ``--untuned`` compiles
without mora_jax.xla_tuning's options (to see what they change).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from mora_jax import logs
from mora_jax.bench import methods, profile, runners
from mora_jax.bench.config import BenchConfig

_CONFIG = config_flags.DEFINE_config_file("config", None, "benchmark configuration (configs/bench_*.py), or any run config")
_METHOD = flags.DEFINE_string("method", "mora1 r=8", 'method label: "full", "lora r=8", "mora6 r=128", "hira r=8", ...')
_STEPS = flags.DEFINE_integer("steps", 3, "profiled steps (after one warm-up step)")
_TOP = flags.DEFINE_integer("top", 20, "rows to print")
_UNTUNED = flags.DEFINE_bool("untuned", False, "compile without mora_jax.xla_tuning's compiler options")
_OUT = flags.DEFINE_string("out", "", "also write the markdown table here")


def main(argv):
    del argv
    logs.apply_verbosity_flag()  # other libraries' INFO lines only with --verbosity
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/bench_250m.py")
    try:
        spec = methods.MethodSpec.from_label(_METHOD.value)
    except ValueError as e:
        raise app.UsageError(f"--{e}") from None
    try:
        run = BenchConfig.from_config(_CONFIG.value).run
    except ValueError as e:
        sys.exit(f"error: config: {e}")
    base = runners.assemble(run)
    params = base.load_params()
    batch = methods.make_batch(base.model_config, run.train.batch_size, run.train.seq_len, run.seed)
    runner = runners.StepRunner(spec, base, params, batch, tuned=not _UNTUNED.value)
    runner.step(record=False)
    result = profile.profile_step(runner, _STEPS.value)
    text = (f"{spec.label} on {methods.model_name(run)}, batch {run.train.batch_size} x {run.train.seq_len}, "
            f"compiler options {runner.compiler_options}\n\n" + profile.profile_markdown(result, _TOP.value))
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
