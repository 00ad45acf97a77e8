"""Entry point: the UUID memorization experiment (the README's first command).

    python -m train.uuid_memorization                                  # ~10 min on 2 CPU cores
    python -m train.uuid_memorization --config=configs/uuid_memorization.py:tiny
    python -m train.uuid_memorization --config.num_pairs=128 --config.workdir=runs/uuid128
"""

from absl import app
from ml_collections import config_flags

from mora_jax.experiments.uuid_memorization import results_markdown, run_uuid_memorization

_CONFIG = config_flags.DEFINE_config_file("config", "configs/uuid_memorization.py", "experiment configuration")


def main(argv):
    del argv
    config = _CONFIG.value
    print(config, flush=True)
    results = run_uuid_memorization(config)
    print("\n" + results_markdown(results))
    print(f"results written to {config.workdir}/results.{{md,json,png}} in {results['total_s']:.0f} s")


if __name__ == "__main__":
    app.run(main)
