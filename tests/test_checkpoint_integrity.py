"""Checkpoint integrity: every sealed step has a manifest; resume verifies the newest step, moves a
damaged one aside (never deletes it) with one line saying why, and falls back to the previous one;
``max_to_keep`` never deletes the last sealed step for newer unsealed ones."""

import json
import pathlib
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mora_jax.checkpoint import Checkpointer, integrity
from mora_jax.training import TrainState


def _state(value: float) -> TrainState:
    return TrainState(step=jnp.asarray(int(value), jnp.int32),
                      frozen={"w": jnp.full((16, 16), value, jnp.float32)},
                      trainables={"params": {}, "adapters": {"m": jnp.arange(64, dtype=jnp.float32).reshape(8, 8) + value}},
                      opt_state={"mu": jnp.full((8, 8), -value, jnp.float32)}, rng=jax.random.key(int(value)))


ABSTRACT = jax.eval_shape(lambda: _state(0.0))
INITIAL_FROZEN = _state(0.0).frozen


def _save_steps(directory, steps, *, frozen_changed=True, async_save=False, keep=None):
    with Checkpointer(directory, mode="resume", enable_async_checkpointing=async_save, max_to_keep=keep) as ckpt:
        for step in steps:
            state = _state(float(step))
            if not frozen_changed:
                state = state.replace(frozen=INITIAL_FROZEN)
            assert ckpt.save(step, state, data_state={"at": step}, frozen_changed=frozen_changed)


def _resume(directory):
    lines = []
    with Checkpointer(directory, mode="resume") as ckpt:
        restored = ckpt.restore_latest_good(abstract_state=ABSTRACT, initial_frozen=INITIAL_FROZEN,
                                            report=lines.append)
        steps = ckpt.all_steps()
    return restored, lines, steps


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("async_save", [False, True])
def test_every_finished_save_is_sealed_with_a_manifest(tmp_path, async_save):
    with Checkpointer(tmp_path, enable_async_checkpointing=async_save) as ckpt:
        ckpt.save(1, _state(1.0), frozen_changed=True)
        ckpt.save(2, _state(2.0), frozen_changed=True)  # seals step 1 (its save has finished) first
        assert (tmp_path / "1" / integrity.MANIFEST_FILE).is_file()
    assert ckpt.sealed_steps() == [1, 2]
    manifest = integrity.read_manifest(tmp_path / "2")
    files = manifest["files"]
    assert "meta/metadata" in files and any(name.startswith("frozen/") for name in files)
    data = _largest_file(tmp_path / "2" / "state")
    entry = files[data.relative_to(tmp_path / "2").as_posix()]
    assert entry["size"] == data.stat().st_size and len(entry["crc32"]) == 8
    assert integrity.check_step(tmp_path / "2", 2).status == "verified"


def _truncate(path: pathlib.Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_middle(path: pathlib.Path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 8: middle + 8] = bytes(16)
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated state": (lambda d: _truncate(_largest_file(d / "state" / "ocdbt.process_0")), r"is truncated \("),
    "truncated frozen": (lambda d: _truncate(_largest_file(d / "frozen")), r"frozen/.* is truncated"),
    "missing item": (lambda d: shutil.rmtree(d / "state"), "the state item is missing"),
    "missing frozen item": (lambda d: shutil.rmtree(d / "frozen"), "the frozen item is missing"),
    "bad meta JSON": (lambda d: (d / "meta" / "metadata").write_text('{"format": "mora_jax.chec'),
                      "meta/metadata is not valid JSON"),
    "empty step dir": (lambda d: (shutil.rmtree(d), d.mkdir()), "its directory is empty"),
    "zeroed bytes": (lambda d: _zero_middle(_largest_file(d / "state" / "ocdbt.process_0")),
                     "does not match its checksum"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_latest_step_is_set_aside_and_the_previous_one_restored(tmp_path, damage):
    _save_steps(tmp_path, [1, 2, 3])
    apply, reason = DAMAGES[damage]
    apply(tmp_path / "3")
    restored, lines, steps = _resume(tmp_path)
    state, data_state, _ = restored
    assert int(state.step) == 2 and data_state == {"at": 2}
    np.testing.assert_array_equal(np.asarray(state.frozen["w"]), np.full((16, 16), 2.0, np.float32))
    assert len(lines) == 1, lines  # one line per damaged step
    assert "checkpoint step 3" in lines[0] and "damaged" in lines[0] and "previous checkpoint" in lines[0]
    assert re.search(reason, lines[0]), lines[0]
    assert steps == [1, 2]
    (moved,) = (tmp_path / integrity.DAMAGED_DIR).iterdir()  # moved aside, not deleted
    assert moved.name.startswith("3-") and str(moved) in lines[0]
    assert "was set aside on resume" in (moved / integrity.DAMAGED_NOTE).read_text()


def test_an_unverified_step_that_cannot_be_read_is_damaged_too(tmp_path):
    """No manifest (killed between orbax's commit and the seal): restored as is, and set aside only
    when reading fails although its arrays have the run's shapes."""
    _save_steps(tmp_path, [1, 2])
    (tmp_path / "2" / integrity.MANIFEST_FILE).unlink()
    assert integrity.check_step(tmp_path / "2", 2).status == "unverified"
    restored, lines, _ = _resume(tmp_path)  # intact: restored, nothing reported
    assert int(restored[0].step) == 2 and lines == []

    for data_file in (tmp_path / "2" / "state").rglob("d/*"):  # every data file of the state
        _truncate(data_file)
    restored, lines, steps = _resume(tmp_path)
    assert int(restored[0].step) == 1 and steps == [1]
    assert len(lines) == 1 and "restoring it failed" in lines[0]


def test_a_config_that_does_not_fit_is_an_error_not_damage(tmp_path):
    _save_steps(tmp_path, [1, 2])
    other = jax.eval_shape(lambda: _state(0.0).replace(opt_state={"mu": jnp.zeros((4, 4))}))
    with Checkpointer(tmp_path, mode="resume") as ckpt:
        with pytest.raises(ValueError, match=r"cannot restore step 2.*only expected: \[\(\(4, 4\).*Resume with the settings it was saved with"):
            ckpt.restore_latest_good(abstract_state=other, initial_frozen=INITIAL_FROZEN)
        assert ckpt.all_steps() == [1, 2]
    assert not (tmp_path / integrity.DAMAGED_DIR).exists()


def test_every_step_damaged_leaves_nothing_to_resume_and_deletes_nothing(tmp_path):
    _save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        (tmp_path / str(step) / "meta" / "metadata").write_text("[")
    restored, lines, steps = _resume(tmp_path)
    assert restored is None and steps == [] and len(lines) == 2
    assert sorted(p.name.split("-")[0] for p in (tmp_path / integrity.DAMAGED_DIR).iterdir()) == ["1", "2"]
    with Checkpointer(tmp_path) as ckpt:  # mode='new': the damaged ones are no checkpoints
        assert ckpt.all_steps() == []


def test_steps_without_frozen_weights_are_checked_too(tmp_path):
    _save_steps(tmp_path, [1, 2], frozen_changed=False)
    _truncate(_largest_file(tmp_path / "2" / "state" / "ocdbt.process_0"))
    restored, lines, _ = _resume(tmp_path)
    assert int(restored[0].step) == 1 and len(lines) == 1


def test_keep_never_pushes_out_the_last_sealed_step(tmp_path):
    assert integrity.steps_to_delete([1, 2, 3, 4], sealed=[1, 2], keep=2) == []
    assert integrity.steps_to_delete([1, 2, 3, 4], sealed=[1, 2, 4], keep=2) == [1]
    assert integrity.steps_to_delete([1, 2, 3, 4], sealed=[1, 2, 4], keep=1) == [1, 2, 3]
    assert integrity.steps_to_delete([1, 2], sealed=[1, 2], keep=None) == []

    _save_steps(tmp_path, [1, 2])
    _save_steps(tmp_path, [3])
    (tmp_path / "3" / integrity.MANIFEST_FILE).unlink()  # written, never sealed (a kill after the commit)
    with Checkpointer(tmp_path, mode="resume", max_to_keep=2, enable_async_checkpointing=False) as ckpt:
        assert ckpt.sealed_steps() == [1, 2]
        ckpt.save(4, _state(4.0), frozen_changed=True)
        assert ckpt.all_steps() == [2, 3, 4]  # step 3 does not count as one of the two kept
        ckpt.save(5, _state(5.0), frozen_changed=True)
        assert ckpt.all_steps() == [4, 5] and ckpt.sealed_steps() == [4, 5]


def test_an_async_save_is_sealed_as_soon_as_it_is_committed(tmp_path):
    """No later save or wait is needed: a kill right after the commit still leaves a verifiable step."""
    ckpt = Checkpointer(tmp_path, enable_async_checkpointing=True)
    ckpt.save(1, _state(1.0), frozen_changed=True)
    deadline = time.monotonic() + 120  # a bound on the wait, not a timing assertion
    while not (tmp_path / "1" / integrity.MANIFEST_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert integrity.check_step(tmp_path / "1", 1).status == "verified"
    ckpt.close()


def test_async_saves_are_sealed_at_close_and_kept_by_number(tmp_path):
    _save_steps(tmp_path, [1, 2, 3, 4], async_save=True, keep=2)
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [3, 4]
    for step in (3, 4):
        assert integrity.check_step(tmp_path / str(step), step).status == "verified"
    manifest = json.loads((tmp_path / "4" / integrity.MANIFEST_FILE).read_text())
    assert manifest["format"] == "mora_jax.checkpoint_manifest/1"
