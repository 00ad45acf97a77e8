"""Entry point: the paper's fine-tuning experiments on a pretrained model, each method at its own tuned
learning rate (docs/finetuning.md).

    python -m train.compare_finetuning --config=configs/smollm2_experiments.py:memorization_quick
    python -m train.compare_finetuning --config=configs/smollm2_experiments.py:continual_results --seeds=3 \
        [--methods=full,lora,mora1,mora6] [--config.FIELD=VALUE ...]

Writes results.md, results.json, results.png and sweep.png into config.workdir (see
mora_jax/experiments/compare_finetuning.py); running it again resumes unfinished runs.
"""

import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from mora_jax import logs

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smollm2_experiments.py:memorization_quick",
                                          "the experiment's configuration (a preset of configs/smollm2_experiments.py)")
_METHODS = flags.DEFINE_string("methods", "", "comma-separated names of config.experiment.methods "
                               "(default: config.experiment.run)")
_SEEDS = flags.DEFINE_integer("seeds", 1, "seeds per method at its chosen rate: config.seed, config.seed + 1, ...")


def main(argv):
    del argv
    logs.apply_verbosity_flag()  # other libraries' INFO lines only with --verbosity
    from mora_jax.experiments import compare_finetuning

    if _SEEDS.value < 1:
        raise app.UsageError("--seeds must be >= 1")
    config = _CONFIG.value
    methods = tuple(m.strip() for m in _METHODS.value.split(",") if m.strip())
    try:
        names = compare_finetuning.method_names(config, methods)
        compare_finetuning.check_config(config, names)
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from None
    seeds = tuple(range(config.seed, config.seed + _SEEDS.value))
    command = "python -m train.compare_finetuning " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = compare_finetuning.compare(config, names, seeds, command=command)
    print("\n" + compare_finetuning.results_markdown(results))
    print(f"results written to {config.workdir}/results.{{md,json,png}} and sweep.png")


if __name__ == "__main__":
    app.run(main)
