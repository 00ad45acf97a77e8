"""Entry point: the paper's pretraining comparison (full, LoRA, ReLoRA, MoRA, ReMoRA on the same tokens),
each method at the learning rate its own sweep chose.

    python -m train.compare_pretraining --config=configs/compare_pretraining.py:cpu \
        [--methods=full,lora,relora,mora,remora] [--seeds=3] [--config.FIELD=VALUE ...]

Writes results.md, results.json, perplexity.png, sweep.png and remora_diagnostics.png into
config.workdir (see mora_jax/experiments/compare_pretraining.py); running it again resumes unfinished runs.
"""

from absl import app, flags
from ml_collections import config_flags

from mora_jax import logs

_CONFIG = config_flags.DEFINE_config_file("config", "configs/compare_pretraining.py:cpu",
                                             "run settings plus experiment.lrs / experiment.sweep_steps")
_METHODS = flags.DEFINE_string("methods", "full,lora,relora,mora,remora", "comma-separated methods to compare (also dora, pissa, hira, mora_mag, remora_mag: "
                              "MoRA / ReMoRA with a DoRA-style magnitude)")
_SEEDS = flags.DEFINE_integer("seeds", 1, "seeds per method: config.seed, config.seed + 1, ...")


def main(argv):
    del argv
    logs.apply_verbosity_flag()  # other libraries' INFO lines only with --verbosity
    from mora_jax.experiments import compare_pretraining

    methods = tuple(m.strip() for m in _METHODS.value.split(",") if m.strip())
    unknown = [m for m in methods if m not in compare_pretraining.METHODS]
    if unknown or not methods:
        raise app.UsageError(f"--methods: unknown {unknown}; choose from {','.join(compare_pretraining.METHODS)}")
    if _SEEDS.value < 1:
        raise app.UsageError("--seeds must be >= 1")
    config = _CONFIG.value
    try:
        compare_pretraining.check_sweep(config, methods)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    seeds = tuple(range(config.seed, config.seed + _SEEDS.value))
    results = compare_pretraining.compare(config, methods, seeds)
    print("\n" + compare_pretraining.results_markdown(results))
    print(f"results written to {config.workdir}/results.{{md,json}}, perplexity.png, sweep.png, remora_diagnostics.png")


if __name__ == "__main__":
    app.run(main)
