"""``mora-jax merge / info / generate`` on hostile files (issue 22, items 9-11): each is one ``mora-jax: error:``
line naming the file and the problem, never a traceback; ``generate`` and ``info`` refuse what ``merge`` refuses
(non-finite values, wrongly typed config fields); chat templates are bounded in time and output."""

import json
import os
import pathlib
import pickle
import re
import shutil
import struct
import threading
import time

import numpy as np
import pytest
import tiny_families as tf
from safetensors.numpy import load_file, save_file

from mora_jax.cli import main
from mora_jax.data.chat_template import ChatTemplateError, render

E2E = pathlib.Path(__file__).parent / "fixtures" / "e2e_public"
BASE, ADAPTER = E2E / "base", E2E / "adapter_type6_r4"
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON parser can recurse


def _copy(source, tmp_path, name):
    return pathlib.Path(shutil.copytree(source, tmp_path / name))


def _raw_header(path, header_text: str, data: bytes = b""):
    raw = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


class _RunsCode:
    """A pickle that would call a function when loaded (here a harmless one)."""

    def __reduce__(self):
        return (os.getcwd, ())


def _one_error_line(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mora-jax: error: "), err
    for fragment in fragments:
        assert str(fragment) in last, last
    return last


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    """The e2e base with a tokenizer (tokenizer.json + tokenizer_config.json with a chat template)."""
    directory = tmp_path_factory.mktemp("chat") / "base"
    shutil.copytree(BASE, directory)
    tf.write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory):
    """A small LoRA adapter (random, finite) for the e2e base."""
    import jax

    import mora_jax as mj
    from mora_jax.hf import load_llama
    from mora_jax.hf.peft import save_adapter

    _, params = load_llama(BASE)
    config = mj.LoRAConfig(r=2, alpha=4.0)
    adapters = mj.init_adapters(params, config, jax.random.key(0))
    adapters = jax.tree_util.tree_map(lambda x: x + 0.01, adapters)
    directory = tmp_path_factory.mktemp("lora") / "adapter"
    save_adapter(directory, config, adapters)
    return directory


# ---- 9. files that crashed the CLI -------------------------------------------------------------------
BASE_FILE_CASES = {
    # json.loads reads 1e400 as inf; int(inf) was an OverflowError traceback
    "shape 1e400": ('{"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', b"\0" * 4,
                    "tensor w has shape [Infinity]; a shape is a list of non-negative integers"),
    # (-2) * (-2) * 4 bytes fits the byte range; the reshape then failed naming no file
    "negative shape": ('{"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}', b"\0" * 16,
                       "tensor w has shape [-2, -2]; a shape is a list of non-negative integers"),
    "100k-deep header": ('{"w": ' + DEEP + "}", b"", "its header's JSON is nested too deeply to read"),
    "float data_offsets": ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0.5, 4]}}', b"\0" * 4,
                           "tensor w has data_offsets [0.5, 4]"),
    "dtype is a list": ('{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4,
                        'tensor w has dtype ["F32"]'),
}


@pytest.mark.parametrize("case", sorted(BASE_FILE_CASES))
def test_a_hostile_base_safetensors_header_is_one_line(tmp_path, capsys, case):
    header, data, message = BASE_FILE_CASES[case]
    base = _copy(BASE, tmp_path, "base")
    _raw_header(base / "model.safetensors", header, data)
    code = main(["merge", "--base", str(base), "--adapter", str(ADAPTER), "--out", str(tmp_path / "out")])
    _one_error_line(capsys, code, base / "model.safetensors", message)


def test_a_100k_deep_adapter_header_or_config_is_one_line(tmp_path, capsys):
    adapter = _copy(ADAPTER, tmp_path, "adapter")
    _raw_header(adapter / "adapter_model.safetensors", '{"a": ' + DEEP + "}")
    _one_error_line(capsys, main(["info", str(adapter)]), adapter / "adapter_model.safetensors", "nested too deeply")
    adapter = _copy(ADAPTER, tmp_path, "adapter2")
    (adapter / "adapter_config.json").write_text('{"r": ' + DEEP + "}")
    for argv in (["info", str(adapter)], ["merge", "--base", str(BASE), "--adapter", str(adapter), "--out",
                                          str(tmp_path / "out")]):
        _one_error_line(capsys, main(argv), adapter / "adapter_config.json", "nested too deeply")
    base = _copy(BASE, tmp_path, "base")
    (base / "config.json").write_text(DEEP)
    code = main(["merge", "--base", str(base), "--adapter", str(ADAPTER), "--out", str(tmp_path / "out")])
    _one_error_line(capsys, code, base / "config.json", "nested too deeply")


def test_a_pickle_that_would_run_code_is_one_line_naming_the_file(tmp_path, capsys):
    pytest.importorskip("torch")
    base = _copy(BASE, tmp_path, "base")
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _RunsCode()}))
    code = main(["merge", "--base", str(base), "--adapter", str(ADAPTER), "--out", str(tmp_path / "out"),
                 "--allow-pickle"])
    _one_error_line(capsys, code, base / "pytorch_model.bin", "torch.load(weights_only=True)",
                    "holds more than tensors")
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04garbage")  # not a pickle at all
    code = main(["merge", "--base", str(base), "--adapter", str(ADAPTER), "--out", str(tmp_path / "out"),
                 "--allow-pickle"])
    _one_error_line(capsys, code, base / "pytorch_model.bin")


def _with_template(chat_base, tmp_path, template):
    base = _copy(chat_base, tmp_path, "chat_base")
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    return base


def test_a_chat_template_that_includes_a_file_is_one_line(chat_base, tmp_path, capsys):
    base = _with_template(chat_base, tmp_path, "{% include '/etc/passwd' %}")
    code = main(["generate", "--base", str(base), "--prompt", "hi", "--chat", "--max-new-tokens", "1"])
    _one_error_line(capsys, code, base / "tokenizer_config.json", "cannot include, import or extend")
    with pytest.raises(ChatTemplateError, match="cannot include"):
        render("{% import 'x.j2' as x %}{{ x }}", [{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="cannot include"):
        render("{% extends 'base.j2' %}", [{"role": "user", "content": "hi"}])


# ---- 10. generate and info refuse what merge refuses ---------------------------------------------------
def _set_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))  # float("inf") is written as Infinity, as a hand-edited file may hold


def _commands(base, adapter, tmp_path):
    return {
        "merge": ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out")],
        "generate": ["generate", "--base", str(base), "--adapter", str(adapter), "--prompt", "the cat",
                     "--max-new-tokens", "2"],
        "info": ["info", str(adapter)],
    }


ADAPTER_CONFIG_CASES = {
    "lora_alpha Infinity": ("lora", {"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    "lora_alpha NaN": ("lora", {"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    "use_mora is the string no": ("mora", {"use_mora": "no"}, "use_mora must be true or false (a JSON boolean), "
                                  "got the string 'no'"),
    "use_rslora is 1": ("lora", {"use_rslora": 1}, "use_rslora must be true or false"),
    "r is a string": ("lora", {"r": "2"}, "r must be a whole number, got the string '2'"),
    "r is a float": ("lora", {"r": 2.0}, "r must be a whole number"),
    "mora_type is a string": ("mora", {"mora_type": "6"}, "mora_type must be a whole number"),
    "lora_dropout is a string": ("lora", {"lora_dropout": "0.1"}, "lora_dropout must be a finite number"),
    "target_modules is a number": ("lora", {"target_modules": 3}, "target_modules must be a list of module names"),
    "use_dora is the string false": ("lora", {"use_dora": "false"}, "use_dora must be true or false"),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_CONFIG_CASES))
def test_merge_generate_and_info_refuse_the_same_adapter_config(chat_base, lora_adapter, tmp_path, capsys, case):
    kind, changes, message = ADAPTER_CONFIG_CASES[case]
    adapter = _copy(lora_adapter if kind == "lora" else ADAPTER, tmp_path, "adapter")
    _set_config(adapter, **changes)
    for name, argv in _commands(chat_base, adapter, tmp_path).items():
        _one_error_line(capsys, main(argv), adapter, message)
    assert not (tmp_path / "out").exists()


def test_generate_refuses_an_adapter_whose_merge_is_not_finite_as_merge_does(chat_base, lora_adapter, tmp_path,
                                                                             capsys):
    adapter = _copy(lora_adapter, tmp_path, "adapter")
    _set_config(adapter, lora_alpha=1e300)  # finite, but K + ΔK overflows float32
    commands = _commands(chat_base, adapter, tmp_path)
    for name in ("merge", "generate"):
        _one_error_line(capsys, main(commands[name]), f"merging {adapter} into {chat_base} gives NaN or infinite "
                        "values in model.layers.0.mlp.down_proj.weight")
    assert main(commands["info"]) == 0  # info has no base to merge into; the config itself is valid
    assert "alpha=1e+300" in capsys.readouterr().out


def test_generate_refuses_a_base_holding_inf_as_merge_does(chat_base, tmp_path, capsys):
    base = _copy(chat_base, tmp_path, "base")
    tensors = load_file(str(base / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"].copy()
    tensors["lm_head.weight"][3, 5] = np.inf
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    for name, argv in _commands(base, ADAPTER, tmp_path).items():
        if name != "info":
            _one_error_line(capsys, main(argv), f"{base / 'model.safetensors'}: base tensor lm_head.weight holds NaN "
                            "or infinite values")
    code = main(["generate", "--base", str(base), "--prompt", "the cat", "--max-new-tokens", "2"])  # no adapter
    _one_error_line(capsys, code, "lm_head.weight holds NaN or infinite values")


@pytest.mark.parametrize("field, value, message", [
    ("tie_word_embeddings", "no", "tie_word_embeddings must be true or false"),
    ("attention_bias", 1, "attention_bias must be true or false"),
    ("rms_norm_eps", float("inf"), "rms_norm_eps must be a finite positive number"),
    ("rope_theta", "10000", "rope_theta must be a finite positive number"),
    ("num_key_value_heads", 2.0, "num_key_value_heads must be a positive whole number"),
])
def test_config_json_fields_are_type_checked(chat_base, tmp_path, capsys, field, value, message):
    base = _copy(chat_base, tmp_path, "base")
    config = json.loads((base / "config.json").read_text())
    config[field] = value
    (base / "config.json").write_text(json.dumps(config))
    for name, argv in _commands(base, ADAPTER, tmp_path).items():
        if name != "info":
            _one_error_line(capsys, main(argv), f"config.json: {message}")


# ---- 11. chat templates are bounded ------------------------------------------------------------------------
def test_generate_chat_with_a_template_that_loops_forever_is_one_line(chat_base, tmp_path, capsys):
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
    base = _with_template(chat_base, tmp_path, loops)
    start = time.monotonic()
    code = main(["generate", "--base", str(base), "--prompt", "hi", "--chat", "--max-new-tokens", "1"])
    assert time.monotonic() - start < 60  # stopped, not run for 10^10 iterations
    _one_error_line(capsys, code, base / "tokenizer_config.json", "was stopped: range(100000,) has 100,000 items")


CHAT = [{"role": "user", "content": "hi"}]
SET_RANGE_LOOPS = ("{% set r = range(10000) %}{% for i in r %}{% for j in r %}{% for k in r %}{% endfor %}{% endfor %}"
                   "{% endfor %}")  # no call inside the loops: only the per-iteration check stops it


@pytest.mark.parametrize("template, message", [
    (SET_RANGE_LOOPS, "ran longer than 0.5 s"),
    ("{% for i in range(9000) %}{% for j in range(9000) %}{% endfor %}{% endfor %}", "more than 1,000,000 items"),
    ("{{ 'x' * 10**9 }}", "a str repeated 1,000,000,000 times"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "a string joined with ~"),
    ("{% set ns = namespace(s=['x']) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "list + list"),
    ("{% for i in range(10000) %}{{ 'y' * 200 }}{% endfor %}", "the rendered text would be"),
    ("{{ 2 ** 100000000 }}", "a number of more than 4096 bits"),
])
def test_chat_template_renders_are_bounded_in_time_and_size(template, message):
    start = time.monotonic()
    # only the first case is about time: the size limits must fire first however busy the machine is
    time_limit_s = 0.5 if template is SET_RANGE_LOOPS else 120.0
    with pytest.raises(ChatTemplateError, match=f"was stopped: .*{re.escape(message)}"):
        render(template, CHAT, time_limit_s=time_limit_s)
    assert time.monotonic() - start < 30


def test_the_time_limit_holds_outside_the_main_thread():
    errors = []

    def run():
        try:
            render(SET_RANGE_LOOPS, CHAT, time_limit_s=0.3)
        except ChatTemplateError as e:
            errors.append(str(e))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive() and errors and "ran longer than 0.3 s" in errors[0]


def test_ordinary_templates_still_render_with_loop_variables_and_long_messages():
    template = ("{% for m in messages %}{{ loop.index }}/{{ loop.length }}:{{ m['content'] }}{% if loop.last %}."
                "{% endif %}{% endfor %}{% for n in [[1, [2]], [3]] recursive %}{{ n if n is number else loop(n) }}"
                "{% endfor %}")
    long = "z" * 2_000_000  # longer than the fixed output budget: the budget grows with the messages
    out = render(template, [{"role": "user", "content": "a"}, {"role": "user", "content": long}])
    assert out == "1/2:a2/2:" + long + ".123"
