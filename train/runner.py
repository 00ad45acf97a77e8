"""The command line shared by ``train/pretrain.py`` and ``train/finetune.py``: a config file with
``--config.FIELD=VALUE`` overrides, one run (:func:`mora_jax.recipes.run`), one closing line.

Multi-host: every process runs the same command. On a TPU pod slice or under SLURM nothing more is
needed; elsewhere give each process ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` (or the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
environment variables). Each process reads its own shard of the data; process 0 writes the metrics
and the exports.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from mora_jax import logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "run configuration (a configs/*.py file[:variant])")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-process runs: HOST:PORT of process 0 (default: $JAX_COORDINATOR_ADDRESS, "
    "or auto-detected on TPU pods / SLURM)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process runs: number of processes "
                                      "(default: $JAX_NUM_PROCESSES or auto-detected; absent = one process)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process runs: this process's index "
                                   "(default: $JAX_PROCESS_ID or auto-detected)")


def _user_errors():
    """Errors that describe a problem with the run's input (config, data, workdir, a diverging run),
    each with its fix in the message."""
    from mora_jax.checkpoint.integrity import CheckpointDamaged
    from mora_jax.checkpoint.workdir_lock import WorkdirLocked
    from mora_jax.data.batching import BadRecordError
    from mora_jax.loop import TrainingDiverged

    return (BadRecordError, CheckpointDamaged, TrainingDiverged, WorkdirLocked, FileNotFoundError)


def main(task: str) -> None:
    """Parse the flags and run ``task`` ("pretrain" or "finetune")."""

    def run(argv):
        del argv
        logs.apply_verbosity_flag()  # other libraries' INFO lines only with --verbosity
        from mora_jax import distributed

        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)  # before any device use
        import jax

        from mora_jax import recipes
        from mora_jax.run_config import RunConfig

        USER_ERRORS = _user_errors()

        config = _CONFIG.value
        if jax.process_index() == 0:
            print(config, flush=True)
        try:
            run_config = RunConfig.from_dict(config)  # every field checked before anything loads
        except ValueError as e:
            sys.exit(f"{task}: error: config: {e}")
        try:
            result = recipes.run(run_config, task)
        except USER_ERRORS as e:  # the input's fault: one line that says what to change, no traceback
            sys.exit(f"{task}: error: {e}")
        status = "preempted (resume by running the same command)" if result.preempted else "finished"
        print(f"{status} at step {int(result.state.step)}; outputs in {config.workdir}", flush=True)

    app.run(run)
