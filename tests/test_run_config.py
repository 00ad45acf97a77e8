"""The one config layer: configs/*.py sections map one-to-one onto run_config's dataclasses, nothing
is held twice, and bad values are refused before anything compiles."""

import dataclasses

import pytest

from configs import base, c4_pretrain, math_finetune
from mora_jax import assembly
from mora_jax.methods import METHODS, LoRAConfig, MoRAConfig
from mora_jax.run_config import RunConfig

SECTIONS = {"model", "adapter", "remora", "optim", "train", "data", "mesh", "checkpoint", "export"}


def _field_names(cls):
    return {f.name for f in dataclasses.fields(cls)}


def test_every_config_section_has_the_fields_of_its_dataclass():
    c = base.base_config()
    run = RunConfig.from_dict(c)
    # ``method`` picks the adapter section's class; the RunConfig holds it once, as run.adapter.method
    assert set(c.keys()) == {f.name for f in dataclasses.fields(RunConfig)} | {"method"}
    assert run.method == run.adapter.method == c.method and "method" not in _field_names(RunConfig)
    for name in SECTIONS - {"adapter", "mesh"}:
        assert set(c[name].keys()) == _field_names(type(getattr(run, name))), name
    adapter_fields = set().union(*(_field_names(cls) for cls in METHODS.values()))
    assert set(c.adapter.keys()) == adapter_fields
    assert run.mesh.axis_names == tuple(c.mesh.keys()) and run.mesh.axis_sizes == tuple(c.mesh.values())
    # same names, same values: nothing renamed on the way
    assert run.optim.lr == c.optim.lr and run.checkpoint.keep == c.checkpoint.keep
    assert run.train.steps == c.train.steps and run.remora.every == c.remora.every


@pytest.mark.parametrize("config", [c4_pretrain.get_config("tiny"), c4_pretrain.get_config("250m"),
                                    c4_pretrain.get_config("1b"), math_finetune.get_config("tiny"),
                                    c4_pretrain.get_config("250m_tpu"), c4_pretrain.get_config("1b_tpu"),
                                    math_finetune.get_config("llama2_7b_tpu"),
                                    math_finetune.get_config("llama31_70b_tpu"),
                                    math_finetune.get_config("llama31_8b_tpu")])
def test_recipe_configs_build(config):
    run = RunConfig.from_dict(config)
    assert run.adapter.method == run.method == config.method
    assert run.to_dict()["optim"]["lr"] == config.optim.lr
    # the micro-batches split evenly over the 8 chips of the TPU recipes' slices
    assert run.train.batch_size % run.train.grad_accum == 0


def test_tpu_recipes_keep_the_reference_batch_and_shard_weights_over_every_chip():
    for variant in ("250m_tpu", "1b_tpu"):
        run = RunConfig.from_dict(c4_pretrain.get_config(variant))
        assert (run.train.batch_size, run.train.seq_len) == (1024, 1024)  # the reference's 1M tokens per step
        assert run.model.remat_policy == "projections" and run.model.scan_layers
        assert run.mesh.axis_sizes == (1, -1, 1)
    run = RunConfig.from_dict(math_finetune.get_config("llama2_7b_tpu"))
    assert run.train.seq_len == 2048 and run.train.batch_size >= 32 and run.model.preset == "llama2-7b"
    with pytest.raises(ValueError, match="llama2_7b_tpu"):
        math_finetune.get_config("llama2_7b")


def test_schedule_length_and_restart_period_are_derived():
    c = c4_pretrain.get_config("tiny")
    run = RunConfig.from_dict(c)
    lr = run.schedule()
    # restarts at every ReMoRA merge (every 10 steps): the learning rate drops to 0 there
    assert float(lr(10)) == 0.0 and float(lr(20)) == 0.0 and float(lr(9)) > 0
    c.remora.every = 15
    lr = RunConfig.from_dict(c).schedule()
    assert float(lr(15)) == 0.0 and float(lr(10)) > 0
    assert run.step_config().grad_accum == c.train.grad_accum and run.step_config().clip_norm == c.optim.clip_norm


def test_full_fine_tuning_has_no_merges_and_mora_starts_at_the_cycle():
    c = c4_pretrain.get_config("tiny")
    c.method = "full"
    assert RunConfig.from_dict(c).remora.every == 0
    c.method = "mora"
    c.adapter.mora_type = 3
    run = RunConfig.from_dict(c)
    assert isinstance(run.adapter, MoRAConfig) and run.initial_adapter_config().mora_type == 1
    c.method = "lora"
    assert isinstance(RunConfig.from_dict(c).adapter, LoRAConfig)


@pytest.mark.parametrize("path, value, message", [
    ("optim.lr", -1e-3, r"optim.lr must be a finite number > 0"),
    ("optim.lr", float("nan"), r"optim.lr must be a finite number > 0"),
    ("optim.clip_norm", -1.0, r"optim.clip_norm must be >= 0"),
    ("optim.decay", "exp", r"optim.decay='exp'"),
    ("train.batch_size", 7, r"train.batch_size=7 is not divisible by train.grad_accum=2"),
    ("train.steps", 0, r"train.steps must be a positive integer"),
    ("checkpoint.mode", "append", r"checkpoint.mode='append'"),
    ("checkpoint.keep", 0, r"checkpoint.keep must be a positive integer"),
    ("method", "vera", r"method='vera'"),
    ("optim.warmup_steps", 50, r"optim.warmup_steps=50 is longer than the run"),
    ("train.loss_chunk", 100, r"train.loss_chunk=100 does not divide train.seq_len=\d+: use a divisor"),
    ("train.loss_chunk", -1, r"train.loss_chunk must be an integer >= 0"),
])
def test_bad_values_are_refused_with_the_field_named(path, value, message):
    c = c4_pretrain.get_config("tiny")
    c.train.grad_accum = 2
    section, _, name = path.rpartition(".")
    (c[section] if section else c)[name] = value
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(c)


def test_unknown_fields_are_refused():
    c = c4_pretrain.get_config("tiny").to_dict()
    c["optim"]["learning_rate"] = 1e-3
    with pytest.raises(ValueError, match=r"config.optim has no field\(s\) \['learning_rate'\]"):
        RunConfig.from_dict(c)
    c = c4_pretrain.get_config("tiny").to_dict()
    c["adapter"]["rank"] = 4
    with pytest.raises(ValueError, match=r"config.adapter has no field\(s\) \['rank'\]"):
        RunConfig.from_dict(c)


def test_mesh_and_batch_must_fit_the_devices():
    c = c4_pretrain.get_config("tiny")  # the test session has 8 CPU devices
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 1
    with pytest.raises(ValueError, match=r"has 4 devices but there are 8"):
        assembly.make_mesh(RunConfig.from_dict(c))
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.train.batch_size, c.train.grad_accum = 8, 2
    with pytest.raises(ValueError, match=r"use a multiple of 16"):
        assembly.make_mesh(RunConfig.from_dict(c))


def test_the_entry_point_reports_a_bad_config_in_one_line():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "train.pretrain", "--config=configs/c4_pretrain.py:tiny",
                           "--config.optim.lr=-1"], capture_output=True, text=True, timeout=300,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("pretrain: error: config: optim.lr must be a finite number > 0")
    assert "Traceback" not in proc.stderr



def test_unset_model_override_placeholders_are_dropped():
    c = c4_pretrain.get_config("250m")  # base.py declares num_hidden_layers etc. as None: settable by flags
    assert dict(RunConfig.from_dict(c).model.overrides) == {}
    c.model.overrides.num_hidden_layers = 4
    assert dict(RunConfig.from_dict(c).model.overrides) == {"num_hidden_layers": 4}
