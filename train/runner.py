"""The command line shared by ``train/pretrain.py`` and ``train/finetune.py``: a config file with
``--config.FIELD=VALUE`` overrides, one run (:func:`mora_jax.recipes.run`), one closing line."""

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "run configuration (a configs/*.py file[:variant])")


def main(task: str) -> None:
    """Parse the flags and run ``task`` ("pretrain" or "finetune")."""

    def run(argv):
        del argv
        from mora_jax import recipes

        config = _CONFIG.value
        print(config, flush=True)
        result = recipes.run(config, task)
        status = "preempted (resume by running the same command)" if result.preempted else "finished"
        print(f"{status} at step {int(result.state.step)}; outputs in {config.workdir}", flush=True)

    app.run(run)
