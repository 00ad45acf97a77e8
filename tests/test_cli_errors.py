"""``mora-jax merge`` on broken inputs: one ``mora-jax: error:`` line naming the file, never a
traceback; NaN/inf adapters and bases refused for that reason; ``--allow-pickle``; writes go to a
temporary name and are renamed (a symlink in OUT_DIR is replaced, never followed); files get the
umask's permissions."""

import json
import os
import pathlib
import shutil
import stat
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mora_jax.cli import main
from mora_jax.hf import files as hf_format

E2E = pathlib.Path(__file__).parent / "fixtures" / "e2e_public"
BASE, ADAPTER = E2E / "base", E2E / "adapter_type6_r4"


def _copy(source, tmp_path, name):
    return pathlib.Path(shutil.copytree(source, tmp_path / name))


def _header_only(path, header):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def _edit_tensors(path, change):
    tensors = load_file(str(path))
    save_file(change(tensors), str(path), metadata={"format": "pt"})


def _fill(value):
    return lambda tensors: {k: np.full_like(v, value) for k, v in tensors.items()}


def _poison_first(tensors):
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = np.nan
    return tensors


# (which copy to break, how, the expected message: fragments in order, " ... " between them; {dir}
# is the broken directory).
CASES = {
    "base header is a JSON list": ("base", lambda d: _header_only(d / "model.safetensors", []),
                                   "{dir}/model.safetensors is not a safetensors file (its header is a JSON array"),
    "base header lacks keys": ("base", lambda d: _header_only(d / "model.safetensors", {"w": {"dtype": "F32"}}),
                               "{dir}/model.safetensors is corrupt: the header entry of w lacks shape, data_offsets"),
    "adapter header is a JSON list": ("adapter", lambda d: _header_only(d / "adapter_model.safetensors", []),
                                      "{dir}/adapter_model.safetensors is not a safetensors file (its header is a JSON array"),
    "adapter header lacks keys": ("adapter", lambda d: _header_only(d / "adapter_model.safetensors",
                                                                    {"a": {"dtype": "F32", "shape": [1]}}),
                                  "{dir}/adapter_model.safetensors is corrupt: the header entry of a lacks data_offsets"),
    "empty model.safetensors": ("base", lambda d: (d / "model.safetensors").write_bytes(b""),
                                "{dir}/model.safetensors is not a safetensors file (empty file)"),
    "5-byte model.safetensors": ("base", lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 5),
                                 "{dir}/model.safetensors is not a safetensors file (only 5 bytes"),
    "config.json is []": ("base", lambda d: (d / "config.json").write_text("[]"),
                          "{dir}/config.json must hold a JSON object, got a JSON array"),
    "config.json is not JSON": ("base", lambda d: (d / "config.json").write_text("{'a': 1}"),
                                "{dir}/config.json is not valid JSON (Expecting property name"),
    "adapter_config.json is not UTF-8": ("adapter", lambda d: (d / "adapter_config.json").write_bytes(b'{"r": "\xff"}'),
                                         "{dir}/adapter_config.json is not valid JSON"),
    "adapter_config.json is a string": ("adapter", lambda d: (d / "adapter_config.json").write_text('"LORA"'),
                                        "{dir}/adapter_config.json must hold a JSON object, got a JSON string"),
    "inf adapter": ("adapter", lambda d: _edit_tensors(d / "adapter_model.safetensors", _fill(np.inf)),
                    "{dir}/adapter_model.safetensors: 28 tensor(s) hold NaN or infinite values"),
    "NaN adapter": ("adapter", lambda d: _edit_tensors(d / "adapter_model.safetensors", _fill(np.nan)),
                    "{dir}/adapter_model.safetensors: 28 tensor(s) hold NaN or infinite values"),
    "NaN base": ("base", lambda d: _edit_tensors(d / "model.safetensors", _poison_first),
                 "{dir}/model.safetensors: base tensor lm_head.weight holds NaN or infinite values"),
    "pickle-only base": ("base", lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"x")),
                         "{dir} holds only pickle checkpoints (pytorch_model.bin) ... "
                         "pass allow_pickle=True (mora-jax merge --allow-pickle)"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_inputs_give_one_error_line_naming_the_file(tmp_path, capsys, case):
    which, damage, message = CASES[case]
    broken = _copy(BASE if which == "base" else ADAPTER, tmp_path, which)
    damage(broken)
    base, adapter = (broken, ADAPTER) if which == "base" else (BASE, broken)
    out = tmp_path / "out"
    code = main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mora-jax: error: "), err
    for fragment in message.format(dir=broken).split(" ... "):
        assert fragment in last, last
    assert not out.exists() or not (out / "model.safetensors").exists()  # nothing written


def test_allow_pickle_reads_a_pickle_base_with_a_warning(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    base = _copy(BASE, tmp_path, "base")
    tensors = load_file(str(base / "model.safetensors"))
    torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    out = tmp_path / "out"
    assert main(["merge", "--base", str(base), "--adapter", str(ADAPTER), "--out", str(out), "--allow-pickle"]) == 0
    err = capsys.readouterr().err
    assert "mora-jax: warning: --allow-pickle" in err
    assert (out / "model.safetensors").is_file()


def test_an_unwritable_out_is_one_error_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "readonly"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if pathlib.Path(p) == out else real_access(p, mode))
    assert main(["merge", "--base", str(BASE), "--adapter", str(ADAPTER), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"mora-jax: error: --out {out} is not writable" in err and "Traceback" not in err
    assert main(["merge", "--base", str(BASE), "--adapter", str(ADAPTER), "--out", str(out / "sub" / "dir")]) == 1
    assert f"its parent directory {out} is not writable" in capsys.readouterr().err


def test_overwrite_replaces_symlinks_in_out_dir_without_following_them(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", "--base", str(BASE), "--adapter", str(ADAPTER), "--out", str(out)]) == 0
    victims = {}
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        victim = tmp_path / f"outside_{name}"
        victim.write_text(f"precious {name}")
        (out / name).unlink()
        (out / name).symlink_to(victim)
        victims[name] = victim
    assert main(["merge", "--base", str(BASE), "--adapter", str(ADAPTER), "--out", str(out), "--overwrite"]) == 0
    for name, victim in victims.items():
        assert victim.read_text() == f"precious {name}"  # the files outside OUT_DIR are untouched
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert not [p.name for p in out.iterdir() if hf_format.is_temporary_file(p.name)]


def test_written_files_have_the_umask_permissions(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        assert main(["merge", "--base", str(BASE), "--adapter", str(ADAPTER), "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {"model.safetensors": 0o640, "config.json": 0o640, "generation_config.json": 0o640}


def test_a_crash_during_a_write_leaves_no_half_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old complete file")

    def crash(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hf_format.atomic_write(target, crash)
    assert target.read_bytes() == b"old complete file" and [p.name for p in tmp_path.iterdir()] == [target.name]
