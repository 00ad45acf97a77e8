"""``mora_jax.hf.files``: the one safetensors reader/writer and HF-name mapping that ``mora_jax.hf``
and ``mora_jax.hf.peft`` share; and ``mora_jax.hf.peft_files``'s tensor names and refusals."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from mora_jax import hf
from mora_jax.hf import peft
from mora_jax.hf.files import (
    FLOAT_DTYPES,
    SafetensorsError,
    SafetensorsFile,
    hf_name_to_path,
    layer_index,
    path_to_hf_name,
    read_safetensors,
    write_safetensors,
)
from mora_jax.hf.peft_files import AdapterFormatError, parse_tensor_name, read_adapter_tensors, tensor_name


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "b.weight": rng.standard_normal((4,)).astype(ml_dtypes.bfloat16),
        "c": np.arange(6, dtype=np.int32).reshape(2, 3),
    }


def test_write_then_read_round_trip(tmp_path):
    tensors = _tensors()
    write_safetensors(tmp_path / "x.safetensors", tensors)
    got = read_safetensors(tmp_path / "x.safetensors")
    assert set(got) == set(tensors)
    for name, value in tensors.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
    reference = load_file(str(tmp_path / "x.safetensors"))  # readable by the safetensors package too
    assert np.array_equal(reference["a.weight"], tensors["a.weight"])
    header_len = struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])[0]
    header = json.loads((tmp_path / "x.safetensors").read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"] == {"format": "pt"}


def test_read_slice(tmp_path):
    tensors = _tensors()
    write_safetensors(tmp_path / "x.safetensors", tensors)
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.shape("a.weight") == (3, 5)
    assert np.array_equal(f.read("a.weight", (slice(1, 3), slice(None))), tensors["a.weight"][1:3])


def test_dtype_filter(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", _tensors())
    with pytest.raises(SafetensorsError, match=r"tensor c has dtype I32; only F64, F32, F16, BF16"):
        read_safetensors(tmp_path / "x.safetensors", dtypes=FLOAT_DTYPES)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: b"\x01\x02", r"only 2 bytes, shorter than its 8-byte header size\)"),
        (lambda data: b"", r"empty file\)"),
        (lambda data: struct.pack("<Q", 10**9) + data[8:], r"header size 1000000000 is larger than the file\)"),
        (lambda data: struct.pack("<Q", 2) + b"[]", r"header is a JSON array, not an object\)"),
        (lambda data: struct.pack("<Q", 4) + b"{no}", r"header is not valid JSON\)"),
        (lambda data: (lambda h: struct.pack("<Q", len(h)) + h)(b'{"a": {"dtype": "F32"}}'),
         r"header entry of a lacks shape, data_offsets"),
        (lambda data: data[:-4], "does not fit its byte range"),
    ],
)
def test_broken_files(tmp_path, damage, message):
    write_safetensors(tmp_path / "x.safetensors", _tensors())
    path = tmp_path / "x.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SafetensorsError, match=f"{message}; fix it"):
        read_safetensors(path, remedy="fix it")


def test_adapter_reader_refuses_integer_tensors(tmp_path):
    write_safetensors(tmp_path / "adapter_model.safetensors", _tensors())
    with pytest.raises(AdapterFormatError, match=r"dtype I32.*floating-point"):
        read_adapter_tensors(tmp_path)


def test_names():
    path = ("model", "layers_12", "self_attn", "q_proj")
    assert path_to_hf_name(path) == "model.layers.12.self_attn.q_proj"
    assert hf_name_to_path("model.layers.12.self_attn.q_proj") == path
    assert (layer_index("layers_12"), layer_index("layers"), layer_index("mlp")) == (12, None, None)
    with pytest.raises(ValueError, match="scanned"):
        path_to_hf_name(("model", "layers", "mlp"))
    name = tensor_name(path, "lora_A")
    assert name == "base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight"
    assert parse_tensor_name(name) == ("model.layers.12.self_attn.q_proj", "lora_A")
    # DoRA's magnitude: PEFT saves it without ".weight"; older PEFT versions wrote ".weight".
    for suffix in ("", ".weight"):
        assert (parse_tensor_name("base_model.model.model.layers.0.q_proj.lora_magnitude_vector" + suffix)
                == ("model.layers.0.q_proj", "lora_magnitude_vector"))
    assert parse_tensor_name("base_model.model.model.layers.0.q_proj.lora_embedding_A") is None


def test_the_hf_package_presents_each_name_from_its_one_home():
    """``mora_jax.hf`` presents the package's public names; each is the defining module's object and
    no module of the package re-exports another's."""
    from mora_jax.hf import checkpoints, peft_files

    homes = {"load_llama": checkpoints, "save_llama": checkpoints, "read_config": checkpoints,
             "params_to_hf_tensors": checkpoints, "load_adapter": peft, "save_adapter": peft,
             "AdapterFormatError": peft_files}
    for name, module in homes.items():
        assert getattr(hf, name) is getattr(module, name), name
        assert name in module.__all__, name
    assert sorted(hf.__all__) == sorted(homes)
    for name in ("load_adapter", "save_adapter"):
        assert name not in checkpoints.__all__, name
    for name in ("AdapterFormatError", "read_adapter_config", "peft_config_dict"):
        assert name not in peft.__all__ and name in peft_files.__all__, name
