"""Entry point: the UUID memorization experiment (the README's first command).

    python -m train.uuid_memorization                                  # ~10 min on 2 CPU cores
    python -m train.uuid_memorization --config=configs/uuid_memorization.py:tiny
    python -m train.uuid_memorization --config.num_pairs=128 --config.workdir=runs/uuid128
    python -m train.uuid_memorization --seeds=3                         # mean ± std over seeds 0, 1, 2
"""

from absl import app, flags
from ml_collections import config_flags

from mora_jax import distributed, logs
from mora_jax.experiments.uuid_memorization import results_markdown, run_uuid_memorization

_CONFIG = config_flags.DEFINE_config_file("config", "configs/uuid_memorization.py", "experiment configuration")
_SEEDS = flags.DEFINE_integer("seeds", 1, "seeds: config.seed, config.seed + 1, ...; the table shows mean ± std")


def main(argv):
    del argv
    logs.apply_verbosity_flag()  # other libraries' INFO lines only with --verbosity
    distributed.initialize()  # multi-host: join the cluster before any device use; one process: a no-op
    config = _CONFIG.value
    print(config, flush=True)
    if _SEEDS.value < 1:
        raise app.UsageError("--seeds must be >= 1")
    results = run_uuid_memorization(config, tuple(range(config.seed, config.seed + _SEEDS.value)))
    print("\n" + results_markdown(results))
    print(f"results written to {config.workdir}/results.{{md,json,png}} in {results['total_s']:.0f} s")


if __name__ == "__main__":
    app.run(main)
