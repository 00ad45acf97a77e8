"""Entry point: pretrain with MoRA / LoRA / full fine-tuning (see configs/ and the README).

    python -m train.pretrain --config=configs/c4_pretrain.py:tiny [--config.FIELD=VALUE ...]
"""

from absl import app
from ml_collections import config_flags

from mora_jax import recipes

_CONFIG = config_flags.DEFINE_config_file("config", None, "run configuration (a configs/*.py file[:variant])")


def main(argv):
    del argv
    config = _CONFIG.value
    print(config, flush=True)
    result = recipes.pretrain(config)
    status = "preempted (resume by running the same command)" if result.preempted else "finished"
    print(f"{status} at step {int(result.state.step)}; outputs in {config.workdir}", flush=True)


if __name__ == "__main__":
    app.run(main)
