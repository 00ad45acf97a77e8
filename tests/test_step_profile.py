"""mora_jax.bench.profile on the tiny model: the trace joins the HLO and the dots add up."""

import pytest

from configs import bench_tiny
from mora_jax import flops
from mora_jax.bench import methods, profile, runners
from mora_jax.bench.config import BenchConfig


@pytest.fixture(scope="module")
def tiny():
    base = runners.assemble(BenchConfig.from_config(bench_tiny.get_config()).run)
    llama_config = base.model_config
    return llama_config, base, base.load_params(), methods.make_batch(llama_config, 2, 32)


@pytest.mark.parametrize("spec", [methods.MethodSpec("full"), methods.MethodSpec("lora", 8), methods.MethodSpec("mora", 8, 6)],
                         ids=lambda s: s.label)
def test_profiled_dot_flops_are_the_steps_matmul_flops(tiny, spec):
    llama_config, base, params, batch = tiny
    runner = runners.StepRunner(spec, base, params, batch)
    runner.step(record=False)
    result = profile.profile_step(runner, steps=2)
    assert result["rows"] and result["step_s"] > 0
    assert result["dot_ms"] > 0 and result["other_ms"] > 0
    # Every matmul of the step is found in a traced fusion or dot, and nothing else is counted as one.
    want = flops.model_flops_per_step(llama_config, 2, 32, spec.method, spec.r, spec.mora_type)
    assert result["dot_gflop"] * 1e9 == pytest.approx(want, rel=0.02)
    assert any(r["backward"] for r in result["rows"]) and any(not r["backward"] for r in result["rows"])
    text = profile.profile_markdown(result, top=5)
    assert text.count("\n|") == 2 + 5


def test_method_labels_parse_back_to_their_spec():
    for spec in methods.method_specs([8, 128], [1, 6]):
        assert methods.MethodSpec.from_label(spec.label) == spec
    assert methods.MethodSpec.from_label(" mora6 r=128 ") == methods.MethodSpec("mora", 128, 6)
    with pytest.raises(ValueError, match="mora<type> r=<r>"):
        methods.MethodSpec.from_label("mora r=8")


def test_hira_step_runs_at_its_flop_floor(tiny):
    """The compiled HiRA step does exactly the FLOP model's matmuls: one matmul per layer with K ⊙ (1 + A·B),
    the dense xᵀ·dy of each kernel and 6·k·r·d per kernel; no second x·ΔK."""
    llama_config, base, params, batch = tiny
    runner = runners.StepRunner(methods.MethodSpec("hira", 8), base, params, batch)
    runner.step(record=False)
    result = profile.profile_step(runner, steps=2)
    want = flops.model_flops_per_step(llama_config, 2, 32, "hira", 8)
    assert result["dot_gflop"] * 1e9 == pytest.approx(want, rel=0.02)
    assert want > flops.model_flops_per_step(llama_config, 2, 32, "full")  # the floor: full's FLOPs and A·B's
