"""The command line shared by ``train/pretrain.py`` and ``train/finetune.py``: a config file with
``--config.FIELD=VALUE`` overrides, one run (:func:`mora_jax.recipes.run`), one closing line.

A problem with the input (a setting, a file, the workdir, a run that diverged: a
:class:`mora_jax.errors.UserError`) ends the run with one ``<task>: error: ...`` line naming it and
the fix, and exit status 1; anything else is a bug and shows its traceback.

Multi-host: every process runs the same command. On a TPU pod slice or under SLURM nothing more is
needed; elsewhere give each process ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` (or the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
environment variables). Each process reads its own shard of the data; process 0 writes the metrics
and the exports.
"""

import re
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


def unknown_field_message(argv, error: BaseException, config) -> str:
    """One line for a ``--config.a.b=v`` override naming a field the config does not have (which
    ml_collections reports as a bare ``AttributeError: "'b'"`` or ``KeyError``)."""
    while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(...))
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    found = re.search(r"'([^']+)'", text)
    missing = found.group(1) if found else text.strip("\"'")
    suggestion = re.search(r"Did you mean .*\?", text)
    overrides = [a for a in argv if a.startswith("--config.")]
    culprit = next((a for a in overrides if missing in a.split("=", 1)[0].split(".")[1:]),
                   overrides[0] if overrides else "")
    path = culprit.split("=", 1)[0][len("--config."):]
    parts = path.split(".")
    section = parts[:parts.index(missing)] if missing in parts else parts[:-1]
    node = config
    for key in section:
        node = node.get(key) if hasattr(node, "get") else None
    valid = sorted(node.keys()) if hasattr(node, "keys") else []
    where = ".".join(section) or "the config"
    hint = (" (from the command line only the fields configs/base.py declares can be set; a config file may "
            "add others)" if section[-1:] == ["overrides"] else "")
    return (f"{culprit}: {where} has no field {missing!r}{hint}; "
            + (f"{suggestion.group(0)} " if suggestion else "")
            + f"Valid: {valid}. Each field is listed and commented in configs/base.py")


def _load_config(argv):
    """The config the ``--config=FILE[:VARIANT]`` of ``argv`` names, without its overrides (None if
    it cannot be loaded)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    try:
        return flags.FLAGS["config"].parser.parse(spec) if spec else None
    except Exception:  # noqa: BLE001 -- only used to list valid fields in a message
        return None


def parse_flags(task: str):
    """absl's flag parsing, with a config override that names no field reported in one line."""

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:  # a malformed value: absl's own one-line report
            sys.exit(f"{task}: error: {e}")
        except (AttributeError, KeyError) as e:  # ml_collections: an override of a field that does not exist
            sys.exit(f"{task}: error: {unknown_field_message(argv, e, _load_config(argv))}")

    return parse


def run_task(config, task: str):
    """Run ``task`` as ``config`` (an ``ml_collections.ConfigDict``) says; a user error becomes
    ``SystemExit("<task>: error: <one line>")``. Returns the loop's result."""
    from mora_jax import recipes
    from mora_jax.errors import ConfigError, UserError
    from mora_jax.run_config import RunConfig

    try:
        run_config = RunConfig.from_dict(config)  # every field checked before anything loads
    except ConfigError as e:
        raise SystemExit(f"{task}: error: config: {one_line(e)}") from None
    try:
        return recipes.run(run_config, task)
    except UserError as e:  # the input's fault: one line that says what to change, no traceback
        raise SystemExit(f"{task}: error: {one_line(e)}") from None
    except FileNotFoundError as e:  # a data file, the tokenizer, a model directory
        raise SystemExit(f"{task}: error: {one_line(e)}") from None


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line."""
    return " ".join(str(error).split("\n"))


def main(task: str) -> None:
    """Parse the flags and run ``task`` ("pretrain" or "finetune")."""

    def run(argv):
        del argv
        logs.apply_verbosity_flag()  # other libraries' INFO lines only with --verbosity
        from mora_jax import distributed

        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)  # before any device use
        import jax

        config = _CONFIG.value
        if jax.process_index() == 0:
            print(config, flush=True)
        result = run_task(config, task)
        status = "preempted (resume by running the same command)" if result.preempted else "finished"
        print(f"{status} at step {int(result.state.step)}; outputs in {config.workdir}", flush=True)

    app.run(run, flags_parser=parse_flags(task))
