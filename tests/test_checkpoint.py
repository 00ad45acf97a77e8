"""Checkpointer: round trips of every leaf, keep-last-N, async saves, ReMoRA merges, atomicity, refusals."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mora_jax as mj
from mora_jax import remora, training
from mora_jax.checkpoint import Checkpointer, with_mora_type
from mora_jax.models.config import LLAMA_CONFIGS
from mora_jax.models.llama import LlamaForCausalLM, init_params
from mora_jax.models.params import stack_layers

CFG = LLAMA_CONFIGS["tiny"]
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _build(params, config, *, layout=None, seed=1):
    """A fresh TrainState (what a run builds at step 0)."""
    tx = mj.optim.adamw(1e-2)
    adapters = mj.init_adapters(params, config, jax.random.key(seed), layout=layout)
    return training.create_train_state(params, adapters, config, tx, jax.random.key(seed + 1))


def _perturb(state, seed=0):
    """Distinct non-trivial values in every float/int leaf of trainables and opt_state, a new rng
    (noise made with numpy: eager jax ops would compile once per leaf shape)."""
    noise = np.random.default_rng(seed)

    def change(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(np.asarray(x, np.float32) + 0.1 * noise.standard_normal(x.shape), x.dtype)
        if jnp.issubdtype(x.dtype, jnp.integer):
            return x + int(noise.integers(1, 100))
        return x

    return state.replace(step=state.step + 5 + seed, trainables=jax.tree_util.tree_map(change, state.trainables),
                         opt_state=jax.tree_util.tree_map(change, state.opt_state),
                         rng=jax.random.fold_in(state.rng, 7 + seed))


def _assert_states_equal(restored, expected):
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(expected)
    assert jax.random.key_impl(restored.rng) == jax.random.key_impl(expected.rng)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(expected.rng))
    as_data = lambda s: s.replace(rng=jax.random.key_data(s.rng))  # noqa: E731
    pairs = zip(jax.tree_util.tree_leaves_with_path(as_data(restored)), jax.tree_util.tree_leaves(as_data(expected)))
    for (path, got), want in pairs:
        assert got.dtype == want.dtype and got.shape == want.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))


def _scanned_lora_state(params):
    """LoRA on a scan_layers model (adapters with a leading layer axis), bf16 base weights."""
    config = mj.LoRAConfig(r=4, alpha=8.0, unfreeze=mj.LLAMA_FULLY_TRAINED)
    scanned_cfg = CFG.replace(scan_layers=True, param_dtype="bfloat16")
    stacked = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), stack_layers(params))
    layout = mj.dense_layout(LlamaForCausalLM(scanned_cfg), jnp.zeros((1, 8), jnp.int32))
    build = lambda: _build(stacked, config, layout=layout)  # noqa: E731
    return build


@pytest.mark.parametrize("kind", ["mora_unrolled", "lora_scanned_bf16"])
def test_round_trip_restores_every_leaf(params, tmp_path, kind):
    if kind == "mora_unrolled":
        build = lambda: _build(params, mj.MoRAConfig(r=4, mora_type=6, unfreeze=(r".*norm/.*",)))  # noqa: E731
    else:
        build = _scanned_lora_state(params)
    state = _perturb(build())
    adapter_leaf = jax.tree_util.tree_leaves(state.adapters)[0]
    assert adapter_leaf.ndim == (3 if kind == "lora_scanned_bf16" else 2)  # stacked vs per-layer adapters
    data_state = {"epoch": 1, "records_read": 42, "source_state": {"shard": 3}}
    with Checkpointer(tmp_path / "ckpt", enable_async_checkpointing=False, run_config={"lr": 1e-2}) as ckpt:
        assert ckpt.save(5, state, data_state=data_state, meta={"tokens": 1234}, frozen_changed=False)
        info = ckpt.restore_metadata()
        assert (info.step, info.frozen_saved, info.run_config) == (5, False, {"lr": 1e-2})
        assert info.mora_type == (6 if kind == "mora_unrolled" else None)
        restored, restored_data, restored_meta = ckpt.restore(
            abstract_state=jax.eval_shape(build), initial_frozen=build().frozen)
    _assert_states_equal(restored, state)
    assert restored_data == data_state and restored_meta == {"tokens": 1234}
    if kind == "lora_scanned_bf16":
        assert jax.tree_util.tree_leaves(restored.frozen)[0].dtype == jnp.bfloat16


def test_keep_last_n_interval_and_force(params, tmp_path):
    state = _build(params, mj.MoRAConfig(r=4, mora_type=1))
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2, enable_async_checkpointing=False) as ckpt:
        saved = [s for s in range(1, 8) if ckpt.save(s, state, frozen_changed=False)]
        assert saved == [2, 4, 6]
        assert ckpt.all_steps() == [4, 6]
        assert ckpt.save(7, state, frozen_changed=False, force=True)  # e.g. the final step
        assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7
        with pytest.raises(FileExistsError, match="never overwritten"):
            ckpt.save(7, state, frozen_changed=False, force=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]


def test_async_save_survives_deleting_the_arrays(params, tmp_path):
    """An async save has copied the arrays when save() returns: the caller may donate/delete them."""
    build = lambda: _build(params, mj.MoRAConfig(r=4, mora_type=6, unfreeze=(r".*norm/.*",)))  # noqa: E731
    state = _perturb(build(), seed=1)
    expected = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), state)
    ckpt = Checkpointer(tmp_path, enable_async_checkpointing=True)
    data_state = {"records_read": 3}
    assert ckpt.save(3, state, data_state=data_state, frozen_changed=False)
    data_state["records_read"] = 99  # mutated after save(): the checkpoint keeps the value at save time
    for leaf in jax.tree_util.tree_leaves(state.replace(frozen={})):
        leaf.delete()
    ckpt.wait_until_finished()
    restored, restored_data, _ = ckpt.restore(abstract_state=jax.eval_shape(build), initial_frozen=build().frozen)
    ckpt.close()
    _assert_states_equal(restored, expected)
    assert restored_data == {"records_read": 3}


def test_restore_after_remora_merge_gets_merged_frozen_and_switched_type(params, tmp_path):
    config = mj.MoRAConfig(r=4, mora_type=1, unfreeze=(r".*norm/.*",))
    tx = mj.optim.adamw(1e-2)
    build = lambda: _build(params, config)  # noqa: E731
    initial = build()
    ckpt = Checkpointer(tmp_path, enable_async_checkpointing=True)
    assert ckpt.save(1, _perturb(initial), frozen_changed=False)
    # the first merge (type 1 -> 2): frozen kernels change, adapters restart with the next type
    merged = jax.jit(lambda s: remora.merge_and_reset(s, tx=tx, next_type=2))(_perturb(initial, seed=2))
    merged = _perturb(merged, seed=3)  # train on a little
    kernel = lambda s: s.frozen["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]  # noqa: E731
    assert not np.array_equal(kernel(merged), kernel(initial))
    assert ckpt.save(4, merged, data_state={"records_read": 4}, frozen_changed=True)
    ckpt.close()

    ckpt = Checkpointer(tmp_path, mode="resume")
    info = ckpt.restore_metadata()
    assert (info.step, info.mora_type, info.frozen_changed, info.frozen_saved) == (4, 2, True, True)
    assert (tmp_path / "4" / "frozen").is_dir() and not (tmp_path / "1" / "frozen").exists()
    # a target built from the run's initial config (type 1) is retargeted to the checkpoint's type
    restored, data_state, _ = ckpt.restore(abstract_state=jax.eval_shape(build))
    _assert_states_equal(restored, merged)
    assert data_state == {"records_read": 4}
    assert restored.adapters["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].mora_type == 2
    # or built explicitly with the metadata's type
    explicit = with_mora_type(jax.eval_shape(build), info.mora_type)
    again, _, _ = ckpt.restore(4, abstract_state=explicit)
    _assert_states_equal(again, merged)
    # the earlier checkpoint (before the merge) still restores from the initial weights
    early, _, _ = ckpt.restore(1, abstract_state=jax.eval_shape(build), initial_frozen=initial.frozen)
    assert early.adapters["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].mora_type == 1
    ckpt.close()


def test_unsaved_frozen_come_from_initial_frozen_and_are_checked(params, tmp_path):
    config = mj.MoRAConfig(r=4, mora_type=1)
    build = lambda: _build(params, config)  # noqa: E731
    state = _perturb(build())
    ckpt = Checkpointer(tmp_path, enable_async_checkpointing=False)
    ckpt.save(2, state, frozen_changed=False)
    assert not (tmp_path / "2" / "frozen").exists()
    abstract = jax.eval_shape(build)
    with pytest.raises(ValueError, match="did not save the frozen base weights.*initial_frozen="):
        ckpt.restore(abstract_state=abstract)
    other_weights = jax.tree_util.tree_map(lambda x: x * 1.01, state.frozen)
    with pytest.raises(ValueError, match="not the base weights"):
        ckpt.restore(abstract_state=abstract, initial_frozen=other_weights)
    with pytest.raises(ValueError, match="structure, shapes and dtypes"):
        ckpt.restore(abstract_state=abstract, initial_frozen={"model": {}})
    restored, _, _ = ckpt.restore(abstract_state=abstract, initial_frozen=build().frozen)
    _assert_states_equal(restored, state)
    # merged weights passed without frozen_changed=True would be lost: refused
    merged = jax.jit(lambda s: remora.merge_and_reset(s, tx=mj.optim.adamw(1e-2), next_type=2))(state)
    with pytest.raises(ValueError, match="Pass frozen_changed=True"):
        ckpt.save(3, merged, frozen_changed=False)
    assert ckpt.all_steps() == [2]
    ckpt.close()


def test_restore_keeps_the_targets_shardings(params, tmp_path):
    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
    build = lambda: _build(params, mj.MoRAConfig(r=4, mora_type=6, unfreeze=(r".*norm/.*",)))  # noqa: E731
    state = _perturb(build(), seed=4)

    def sharded(x):
        spec = P("data") if x.ndim and x.shape[0] % 8 == 0 else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    abstract = jax.tree_util.tree_map(sharded, jax.eval_shape(build))
    with Checkpointer(tmp_path, enable_async_checkpointing=False) as ckpt:
        ckpt.save(9, state, frozen_changed=True)
        restored, _, _ = ckpt.restore(abstract_state=abstract)
    _assert_states_equal(restored, state)
    for got, want in zip(jax.tree_util.tree_leaves(restored.replace(rng=jnp.zeros(()))),
                         jax.tree_util.tree_leaves(abstract.replace(rng=jnp.zeros(())))):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    embed = restored.frozen["model"]["embed_tokens"]["embedding"]
    assert embed.sharding.spec == P("data") and len(embed.addressable_shards) == 8


def test_partial_save_is_ignored_and_cleaned_up(params, tmp_path):
    """A crash mid-save leaves an orbax temporary directory for the newer step; it is not a checkpoint."""
    build = lambda: _build(params, mj.MoRAConfig(r=4, mora_type=6))  # noqa: E731
    state = _perturb(build())
    with Checkpointer(tmp_path, enable_async_checkpointing=False) as ckpt:
        ckpt.save(1, state, data_state={"at": 1}, frozen_changed=False)
    stray = tmp_path / "2.orbax-checkpoint-tmp-1700000000000000"
    (stray / "state").mkdir(parents=True)
    (stray / "meta").mkdir()
    (stray / "state" / "garbage").write_bytes(b"\x00" * 100)
    with Checkpointer(tmp_path, mode="resume") as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        restored, data_state, _ = ckpt.restore(abstract_state=jax.eval_shape(build), initial_frozen=build().frozen)
        _assert_states_equal(restored, state)
        assert data_state == {"at": 1}
        ckpt.save(2, state, frozen_changed=False)  # the step can be saved again
    assert not stray.exists()
    assert Checkpointer(tmp_path, mode="resume").all_steps() == [1, 2]


_KILLED_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from mora_jax.checkpoint import Checkpointer
    from mora_jax.training import TrainState

    def state(value):
        return TrainState(step=jnp.asarray(value, jnp.int32), frozen={"w": jnp.full((4, 4), value, jnp.float32)},
                          trainables={"params": {}, "adapters": {"m": jnp.full((3, 3), value, jnp.float32)}},
                          opt_state={}, rng=jax.random.key(value))

    ckpt = Checkpointer(sys.argv[1], enable_async_checkpointing=True)
    ckpt.save(1, state(1), data_state={"at": 1}, frozen_changed=True)
    ckpt.wait_until_finished()

    async def killed_before_commit(self):  # all data written, the rename to the final name not done
        print("tmp:", self.get(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    atomicity.AtomicRenameTemporaryPath.finalize = killed_before_commit
    ckpt.save(2, state(2), data_state={"at": 2}, frozen_changed=True)
    ckpt.wait_until_finished()
    print("not killed", flush=True)
""")


def test_process_killed_during_save_leaves_previous_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", _KILLED_DURING_SAVE, str(ckpt_dir)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "tmp:" in proc.stdout and "not killed" not in proc.stdout
    assert [p.name for p in ckpt_dir.iterdir() if p.name.startswith("2.")]  # the interrupted save's files
    with Checkpointer(ckpt_dir, mode="resume") as ckpt:
        assert ckpt.latest_step() == 1
        info = ckpt.restore_metadata()
        assert info.data_state == {"at": 1} and info.frozen_saved
        abstract = training.TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), frozen={"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)},
            trainables={"params": {}, "adapters": {"m": jax.ShapeDtypeStruct((3, 3), jnp.float32)}},
            opt_state={}, rng=jax.eval_shape(lambda: jax.random.key(0)))
        restored, _, _ = ckpt.restore(abstract_state=abstract)
    assert int(restored.step) == 1 and float(restored.frozen["w"][0, 0]) == 1.0
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(1)))


def test_refuses_to_mix_runs_and_overwrite_is_explicit(params, tmp_path, caplog):
    state = _build(params, mj.MoRAConfig(r=4, mora_type=6))
    with Checkpointer(tmp_path, enable_async_checkpointing=False, run_config={"lr": 1}) as ckpt:
        ckpt.save(1, state, frozen_changed=False)
        ckpt.save(2, state, frozen_changed=False)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError) as err:
        Checkpointer(tmp_path)  # mode="new" is the default
    message = str(err.value)
    assert str(tmp_path) in message and "mode='resume'" in message and "mode='overwrite'" in message
    with caplog.at_level("WARNING", logger="mora_jax.checkpoint"):
        assert Checkpointer(tmp_path, mode="resume", run_config={"lr": 2}).all_steps() == [1, 2]
    assert "differs from the checkpoint's in ['lr']" in caplog.text
    with Checkpointer(tmp_path, mode="overwrite") as ckpt:
        assert ckpt.all_steps() == [] and ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoint to restore"):
            ckpt.restore(abstract_state=jax.eval_shape(lambda: state))
    assert (tmp_path / "notes.txt").read_text() == "not a checkpoint"
    assert not (tmp_path / "1").exists() and not (tmp_path / "2").exists()
    empty = tmp_path / "fresh"
    assert Checkpointer(empty, mode="resume").latest_step() is None  # first start of a restartable job
    with pytest.raises(ValueError, match="mode must be one of"):
        Checkpointer(tmp_path, mode="append")


def test_clear_errors_for_bad_inputs(params, tmp_path):
    state = _build(params, mj.MoRAConfig(r=4, mora_type=6))
    with Checkpointer(tmp_path, enable_async_checkpointing=False) as ckpt:
        with pytest.raises(TypeError, match="data_state must be JSON-serialisable"):
            ckpt.save(1, state, data_state={"x": object()}, frozen_changed=False)
        assert ckpt.all_steps() == []
        ckpt.save(1, state, frozen_changed=False)
        with pytest.raises(FileNotFoundError, match="no checkpoint for step 5"):
            ckpt.restore_metadata(5)
        lora = jax.eval_shape(lambda: _build(params, mj.LoRAConfig(r=4)))
        with pytest.raises(ValueError, match="cannot restore step 1"):
            ckpt.restore(abstract_state=lora, initial_frozen=state.frozen)
    record = json.loads((tmp_path / "1" / "meta" / "metadata").read_text())
    assert record["format"] == "mora_jax.checkpoint/1" and record["frozen_saved"] is False
