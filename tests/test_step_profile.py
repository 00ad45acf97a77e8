"""mora_jax.step_profile on the tiny model: the trace joins the HLO and the dots add up."""

import jax
import pytest

from configs import bench_tiny
from mora_jax import benchmark, step_profile
from mora_jax.models.llama import LlamaForCausalLM, init_params


@pytest.fixture(scope="module")
def tiny():
    c = bench_tiny.get_config()
    _, llama_config = benchmark.llama_config_from(c)
    params = init_params(llama_config, jax.random.key(0))
    return llama_config, LlamaForCausalLM(llama_config), params, benchmark.make_batch(llama_config, 2, 32)


@pytest.mark.parametrize("spec", [benchmark.MethodSpec("full"), benchmark.MethodSpec("lora", 8), benchmark.MethodSpec("mora", 8, 6)],
                         ids=lambda s: s.label)
def test_profiled_dot_flops_are_the_steps_matmul_flops(tiny, spec):
    llama_config, model, params, batch = tiny
    runner = benchmark.StepRunner(spec, model, params, batch)
    runner.step(record=False)
    profile = step_profile.profile_step(runner, steps=2)
    assert profile["rows"] and profile["step_s"] > 0
    assert profile["dot_ms"] > 0 and profile["other_ms"] > 0
    # Every matmul of the step is found in a traced fusion or dot, and nothing else is counted as one.
    want = benchmark.model_flops_per_step(llama_config, 2, 32, spec.method, spec.r, spec.mora_type)
    assert profile["dot_gflop"] * 1e9 == pytest.approx(want, rel=0.02)
    assert any(r["backward"] for r in profile["rows"]) and any(not r["backward"] for r in profile["rows"])
    text = step_profile.profile_markdown(profile, top=5)
    assert text.count("\n|") == 2 + 5


def test_method_labels_parse():
    from train.profile_step import parse_method

    assert parse_method("mora6 r=128") == benchmark.MethodSpec("mora", 128, 6)
    assert parse_method("lora r=8") == benchmark.MethodSpec("lora", 8)
    assert parse_method("full") == benchmark.MethodSpec("full")
    from absl import app

    with pytest.raises(app.UsageError, match="mora<type> r=<r>"):
        parse_method("mora r=8")
