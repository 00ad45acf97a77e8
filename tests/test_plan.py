"""The TPU planner (mora_jax.plan, train/plan.py): topologies, the HLO reading, and real TPU compiles from
this CPU machine (libtpu from the ``tpu`` extra; those tests skip without it, CI installs it).

TPU compiles are slow on two busy cores (seconds for the tiny model, minutes for 250M widths), so the
compiling tests use scanned, few-layer models and share their plans through module fixtures.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from mora_jax.plan import chips, hlo
from mora_jax.plan.chips import PlanError
from mora_jax.run_config import RunConfig

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e '.[tpu]')")
ROOT = pathlib.Path(__file__).resolve().parents[1]
PLANS_MADE: list[float] = []  # the estimated MFU of every plan the tests below make


@pytest.fixture(scope="module", autouse=True)
def every_plan_estimates_at_most_100_percent_mfu():
    """Every plan these tests make (the planner, its search, the benchmark's TPU column) estimates an MFU
    of at most 1: a step cannot do more model FLOPs than the chips' peak. An estimate above it means the
    roofline's time or the FLOP model is wrong for that program (issue 22: 103.7-107.7% before)."""
    from mora_jax.plan import roofline

    real = roofline.mfu

    def checked(step, chip, chips):
        value = real(step, chip, chips)
        assert value is None or 0 < value <= 1.0, f"estimated MFU {value:.4f} > 1 ({step.get('bound')}-bound step)"
        if value is not None:
            PLANS_MADE.append(value)
        return value

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(roofline, "mfu", checked)
        yield


# ----- topologies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, chip, dims", [
    ("v5e:2x2", "v5e", (2, 2)), ("v4:2x2x1", "v4", (2, 2, 1)), ("v4:2x2", "v4", (2, 2, 1)),
    ("v5p:2x2x2", "v5p", (2, 2, 2)), ("v6e:4x4", "v6e", (4, 4)), ("v5litepod:2x4", "v5e", (2, 4)),
])
def test_parse_topology(name, chip, dims):
    topology = chips.parse_topology(name)
    assert topology.chip.name == chip and topology.dims == dims
    assert topology.chips == dims[0] * dims[1] * (dims[2] if len(dims) > 2 else 1)


@pytest.mark.parametrize("name, match", [
    ("v9:2x2", "unknown TPU generation 'v9'"), ("v5e", "is not GENERATION:AxB"), ("v5e:2x2x2", "2 dimensions"),
    ("v5e:32x32", "more than a v5e pod"), ("", "is not GENERATION"),
])
def test_bad_topology_names(name, match):
    with pytest.raises(PlanError, match=match):
        chips.parse_topology(name)


def test_chip_table_has_the_documented_hbm():
    assert {name: spec.hbm_bytes // chips.GiB for name, spec in chips.CHIPS.items()} == {
        "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
    for spec in chips.CHIPS.values():
        assert spec.source and spec.bf16_flops > 1e14 and spec.hbm_bytes_per_s > 5e11 and spec.ici_ports in (4, 6)


def test_missing_libtpu_says_install_the_tpu_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
    with pytest.raises(PlanError, match="install the tpu extra"):
        chips.topology_devices(chips.parse_topology("v5e:2x2"))


# ----- reading the HLO ---------------------------------------------------------------------------

# A scanned layer as TPU HLO writes it: a while loop of 24 trips whose body all-gathers a weight and
# runs a fused dot, plus a batched dot written as a convolution with a dilated window (its batch axis),
# and one all-gather split into pieces that share a channel (one before the loop, one inside it).
SYNTHETIC_HLO = """HloModule jit_step, is_scheduled=true, num_partitions=4

%fused_dot (p0: bf16[8,64], p1: bf16[64,32]) -> bf16[8,32] {
  %p0 = bf16[8,64]{1,0} parameter(0)
  %p1 = bf16[64,32]{1,0} parameter(1)
  ROOT %convolution.1 = bf16[8,32]{1,0} convolution(%p0, %p1), dim_labels=bf_io->bf, metadata={op_name="jit(step)/jvp(m)/dot_general"}
}

%body (param: (s32[], bf16[8,64], bf16[64,32])) -> (s32[], bf16[8,64], bf16[64,32]) {
  %param = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%param), index=0
  %x = bf16[8,64]{1,0} get-tuple-element(%param), index=1
  %w = bf16[64,32]{1,0} get-tuple-element(%param), index=2
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %ag = bf16[256,32]{1,0} all-gather(%w), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %piece = bf16[128,32]{1,0} all-gather(%x), channel_id=5, replica_groups=[1,4]<=[4], dimensions={0}
  %y = bf16[8,32]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot, backend_config={"a":
"multi-line config"
}}
  ROOT %t = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) tuple(%next, %x, %w)
}

%cond (param.1: (s32[], bf16[8,64], bf16[64,32])) -> pred[] {
  %param.1 = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%param.1), index=0
  %n = s32[] constant(24)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x0: bf16[8,64], w0: bf16[64,32], q: bf16[8,16,64], k: bf16[8,64,32], g: f32[1024], xt: bf16[8,16], dy: bf16[8,32]) -> f32[1024] {
  %x0 = bf16[8,64]{1,0} parameter(0)
  %w0 = bf16[64,32]{1,0} parameter(1)
  %q = bf16[8,16,64]{2,1,0} parameter(2)
  %k = bf16[8,64,32]{2,1,0} parameter(3)
  %g = f32[1024]{0} parameter(4)
  %xt = bf16[8,16]{1,0} parameter(5)
  %dy = bf16[8,32]{1,0} parameter(6)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) tuple(%zero, %x0, %w0)
  %loop = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) while(%init), condition=%cond, body=%body
  %piece.1 = bf16[128,32]{1,0} all-gather(%w0), channel_id=5, replica_groups=[1,4]<=[4], dimensions={0}
  %bmm = bf16[8,16,32]{2,1,0} convolution(%q, %k), window={size=8 stride=7 lhs_dilate=8}, dim_labels=0bf_0io->0bf
  %wgrad = bf16[16,32]{1,0} convolution(%xt, %dy), dim_labels=fb_io->bf, metadata={op_name="jit(step)/transpose(jvp(m))/proj/dot_general"}
  ROOT %ar = f32[1024]{0} all-reduce(%g), channel_id=2, replica_groups={{0,1},{2,3}}, to_apply=%add
}
"""


def test_hlo_weighs_loop_bodies_by_their_trip_count():
    stats = hlo.analyze(SYNTHETIC_HLO)
    assert stats.loop_trip_counts == [24] and stats.unknown_trip_counts == 0 and stats.num_partitions == 4
    loop_dot = 24 * 2 * 8 * 32 * 64  # the fused dot, once per trip
    batched = 2 * 8 * 16 * 32 * 64  # one window tap per batch element: 8 dots of 16x64 @ 64x32
    wgrad = 2 * 16 * 32 * 8
    assert stats.matmul_flops == loop_dot + batched + wgrad
    gather = stats.collectives["all-gather"]
    assert gather["count"] == 24 + 1 and gather["group_sizes"] == [4]  # the pieces of channel 5: one collective
    assert gather["bytes"] == 24 * 256 * 32 * 2 + 128 * 32 * 2
    assert gather["wire_bytes"] == pytest.approx(0.75 * gather["bytes"])
    reduce = stats.collectives["all-reduce"]
    assert reduce["count"] == 1 and reduce["group_sizes"] == [2] and reduce["wire_bytes"] == pytest.approx(4096)
    assert stats.hbm_bytes > 24 * (8 * 64 + 64 * 32 + 8 * 32) * 2  # the loop's fusion, 24 times


# MoRA type 6's chunk products (``...nr,nrs->...ns``) as TPU HLO writes them: a convolution with two
# spatial axes listed in the kernel's labels in another order than their numbers (``1o0i``); the
# window's attributes go by spatial number. The batch axis of 4 chunks is a dilated window (one tap
# per output), the token axis a padded window over a size-1 input (one tap per output).
BATCHED_CONV_HLO = """HloModule jit_step, num_partitions=1

ENTRY %main (blocks: bf16[4,8,6,1], chunks: bf16[3,5,4,8]) -> bf16[4,6,3,5] {
  %blocks = bf16[4,8,6,1]{3,2,1,0} parameter(0)
  %chunks = bf16[3,5,4,8]{3,2,1,0} parameter(1)
  ROOT %u = bf16[4,6,3,5]{3,2,1,0} convolution(%blocks, %chunks), window={size=4x3 stride=3x1 pad=0_0x2_2 lhs_dilate=4x1 rhs_reversal=0x1}, dim_labels=0fb1_1o0i->0b1f
}
"""


def test_hlo_counts_a_batched_convolution_by_the_window_of_each_spatial_number():
    assert hlo.analyze(BATCHED_CONV_HLO).matmul_flops == 2 * (4 * 6 * 3 * 5) * 8  # contracted over r=8 only


def test_kernel_gradient_dots_finds_backward_dots_shaped_like_a_kernel():
    assert hlo.kernel_gradient_dots(SYNTHETIC_HLO, [(48, 80)]) == []  # no shard of it is 16 x 32
    assert hlo.kernel_gradient_dots(SYNTHETIC_HLO, [(16, 32)]) == ["wgrad"]  # backward, kernel-shaped
    assert hlo.kernel_gradient_dots(SYNTHETIC_HLO, [(8, 32)]) == []  # only the forward dot has this shape


# ----- compiling for TPU slices --------------------------------------------------------------------


def _config(name: str = "c4_pretrain", variant: str = "tiny", **changes) -> RunConfig:
    module = __import__(f"configs.{name}", fromlist=["get_config"])
    c = module.get_config(variant)
    c.model.scan_layers = True
    for dotted, value in changes.items():
        node = c
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return RunConfig.from_dict(c)


@pytest.fixture(scope="module")
def tiny_plans():
    from mora_jax.plan import planner

    return {topology: planner.plan(_config(), topology) for topology in ("v5e:2x2", "v4:2x2x1")}


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("topology, kind", [("v5e:2x2", "TPU v5 lite"), ("v4:2x2x1", "TPU v4")])
def test_tiny_config_compiles_train_eval_and_merge(tiny_plans, topology, kind):
    plan = tiny_plans[topology]
    assert plan["chips"] == 4 and plan["device_kind"] == kind and plan["fits"]
    assert plan["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    for name in ("train", "eval", "merge"):
        step = plan["steps"][name]
        memory = step["bytes_per_chip"]
        assert step["compiled"] and step["fits"] and memory["total"] > 0 and memory["arguments"] > 0
        assert step["estimated_step_s"] > 0 and step["bound"] in ("compute", "memory", "communication")
    train = plan["steps"]["train"]
    assert train["loop_trip_counts"] and min(train["loop_trip_counts"]) == 2  # the 2 scanned layers
    # the scanned body counted twice: more matmul FLOPs than XLA's cost analysis reports for it
    assert train["hlo_matmul_flops"] > 0 and 0 < train["estimated_mfu"] < 1
    assert "all-reduce" in train["collectives"]  # data parallelism: gradients are summed over chips
    assert plan["steps"]["merge"]["next_mora_type"] == 2  # ReMoRA's cycle 1 -> 2


@needs_libtpu
@pytest.mark.slow
def test_memory_grows_with_the_batch_and_the_fit_flips_when_it_is_absurd(tiny_plans):
    from mora_jax.plan import advice, planner

    small = tiny_plans["v5e:2x2"]["steps"]["train"]["bytes_per_chip"]
    larger = planner.plan(_config(train__batch_size=64), "v5e:2x2", steps=("train",))
    assert larger["fits"] and larger["steps"]["train"]["bytes_per_chip"]["temp"] > small["temp"]
    absurd_config = _config(train__batch_size=262144, train__seq_len=128, model__overrides__max_position_embeddings=128)
    absurd = planner.plan(absurd_config, "v5e:2x2", steps=("train",))
    train = absurd["steps"]["train"]
    assert not absurd["fits"] and not train["fits"]
    assert train["bytes_per_chip"]["total"] > chips.CHIPS["v5e"].hbm_bytes  # the compiler's own figure
    tips = advice.suggestions(absurd, absurd_config)
    assert "per chip" in tips[0] and any("grad_accum" in t for t in tips) and any("remat_policy" in t for t in tips)


@needs_libtpu
@pytest.mark.slow
def test_mora_step_has_no_weight_gradient_for_frozen_kernels():
    """The compiled TPU program of a MoRA step computes no gradient for the frozen kernels it adapts;
    full fine-tuning's (the control) does."""
    from mora_jax import flops
    from mora_jax.plan import planner

    def gradient_dots(method):
        # r=4: type 6's window blocks on this 64-wide model are (64, r̂) and (128, r̂); at r=8 (r̂ = 32 on
        # the 64x64 kernels) their gradients would have k_proj's shape, (64, 32), and be counted by shape
        config = _config("math_finetune", "tiny", method=method, adapter__dropout=0.0, adapter__r=4, train__seq_len=64)
        prepared = planner.prepare(config, "v5e:2x2")
        assert prepared.steps.mesh.shape["data"] == 4  # weights replicated: a weight gradient is kernel-sized
        text = prepared.steps.lower_train(prepared.state, prepared.batch).compile().as_text()
        shapes = flops.llama_kernel_shapes(prepared.llama_config).values()
        return hlo.kernel_gradient_dots(text, shapes, max_shards=1)

    assert gradient_dots("mora") == []
    assert len(gradient_dots("full")) >= 7  # one per trained kernel of the scanned layer, at least


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e:2x2", "v4:2x2x1"])
def test_two_layer_250m_wide_config_compiles(topology):
    """The 250M widths (d=768, F=2560, 32k vocabulary), two scanned layers, MoRA type 6 r=8, fsdp."""
    from mora_jax.plan import planner

    config = _config("c4_pretrain", "250m", model__overrides__num_hidden_layers=2, train__seq_len=128,
                     train__batch_size=8, train__grad_accum=1, adapter__mora_type=6, adapter__r=8,
                     remora__every=0)
    plan = planner.plan(config, topology, steps=("train",))
    train = plan["steps"]["train"]
    assert plan["fits"] and plan["mesh"]["fsdp"] == 4
    assert 0 < train["bytes_per_chip"]["total"] < 2 * chips.GiB
    assert "all-gather" in train["collectives"]  # fsdp gathers the sharded weights
    assert train["model_flops_per_step"] > train["hlo_matmul_flops"] > 0  # 4 chips share the work


@needs_libtpu
@pytest.mark.slow
def test_quantized_base_is_planned_at_its_own_width_with_its_dequantization():
    """model.quantize in a plan: the frozen projections are 4-bit codes (half a byte each) beside
    their scales, the compiled step reads those codes and dequantizes them, and the float base's
    plan has neither."""
    from mora_jax.plan import planner

    plans = {}
    for fmt in ("none", "nf4"):
        config = _config("math_finetune", "tiny", model__overrides__num_hidden_layers=1,
                         model__overrides__intermediate_size=128, model__quantize__format=fmt, train__seq_len=64,
                         train__loss_chunk=32, model__param_dtype="bfloat16")  # weights replicated (data=4)
        plans[fmt] = planner.plan(config, "v5e:2x2", steps=("train",))
    float_plan, nf4 = plans["none"], plans["nf4"]
    assert float_plan["run"]["quantize"] == {"format": "none"} and nf4["run"]["quantize"]["format"] == "nf4"
    assert nf4["fits"] and nf4["run"]["loss_chunk"] == 32
    # the seven projections of one layer: d=64, F=128, 4 query / 2 kv heads of 16
    projection_elements = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3
    by_dtype = nf4["state_bytes_per_chip"]["frozen_by_dtype"]
    assert nf4["mesh"]["data"] == 4
    assert by_dtype["uint4"] == projection_elements // 2  # NF4 indices, half a byte each
    assert by_dtype["float32"] == projection_elements // 64 * 4  # one float32 scale per 64 weights
    assert "uint4" not in float_plan["state_bytes_per_chip"]["frozen_by_dtype"]
    saved = float_plan["state_bytes_per_chip"]["frozen"] - nf4["state_bytes_per_chip"]["frozen"]
    assert saved == projection_elements * 2 - by_dtype["uint4"] - by_dtype["float32"]  # a bf16 base
    dequantize = nf4["steps"]["train"]["dequantize"]
    assert dequantize["elements"] >= 2 * projection_elements  # forward and backward, at least
    assert dequantize["code_hbm_bytes"] > 0
    assert "dequantize" not in float_plan["steps"]["train"]


@needs_libtpu
@pytest.mark.slow
def test_mora_type6_memory_per_chip_is_within_a_tenth_of_loras():
    """Issue 10's goal on the 250M widths (2 scanned layers, 8 × 1024 tokens per chip, fsdp=4, no
    remat): a type-6 step once took 1.5× LoRA's memory (float32 rotated activations kept for the
    backward pass) and the same rank's memory must stay within 1.1× LoRA's."""
    from mora_jax.plan import planner
    from mora_jax.plan.report import with_method

    config = _config("c4_pretrain", "250m", model__overrides__num_hidden_layers=2, train__seq_len=1024,
                     train__batch_size=32, train__grad_accum=1, adapter__mora_type=6, adapter__r=8,
                     remora__every=0, model__remat_policy="none", mesh__data=1, mesh__fsdp=-1)
    totals = {}
    for method in ("mora", "lora"):
        plan = planner.plan(with_method(config, method) if method != "mora" else config, "v5e:2x2", steps=("train",))
        totals[method] = plan["steps"]["train"]["bytes_per_chip"]["total"]
    assert totals["mora"] <= 1.1 * totals["lora"], {k: v / chips.GiB for k, v in totals.items()}


@needs_libtpu
def test_mesh_that_does_not_cover_the_slice_is_one_clear_error():
    from mora_jax.plan import planner

    with pytest.raises(PlanError, match=r"has 3 devices but there are 4.*v5e:2x2 slice has 4 chips"):
        planner.prepare(_config(mesh__data=3), "v5e:2x2")


@needs_libtpu
def test_eval_is_planned_only_when_the_run_evaluates():
    from mora_jax.plan import planner

    plan = planner.plan(_config(data__eval_source=""), "v5e:2x2", steps=("eval", "merge"))
    assert plan["steps"]["eval"] is None and "data.eval_source" in plan["eval_note"]
    assert plan["steps"]["merge"] is not None  # the tiny recipe merges every 10 steps


# ----- the command line ---------------------------------------------------------------------------


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "train.plan", *args], capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})


def test_cli_unknown_topology_is_one_line():
    proc = _cli("--config=configs/c4_pretrain.py:tiny", "--topology=v9:2x2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown TPU generation 'v9' in topology 'v9:2x2': choose one of ['v4', 'v5e', 'v5p', 'v6e'] "
        "(e.g. v4:2x2x2, v5e:2x2, v5p:2x2x2, v6e:2x2)"]


def test_cli_takes_model_overrides_and_names_a_misspelt_one():
    proc = _cli("--config=configs/c4_pretrain.py:tiny", "--config.model.overrides.num_hidden_layers=1", "--topology=v9:2x2")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: unknown TPU generation")
    proc = _cli("--config=configs/c4_pretrain.py:tiny", "--config.model.overrides.num_hidden_layrs=1", "--topology=v9:2x2")
    assert proc.returncode != 0 and 'Did you mean "num_hidden_layers"' in proc.stderr


@needs_libtpu
def test_cli_mesh_mismatch_is_one_line():
    proc = _cli("--config=configs/c4_pretrain.py:tiny", "--topology=v5e:2x4", "--config.mesh.data=4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has 4 devices but there are 8" in errors[0]


@needs_libtpu
@pytest.mark.slow
def test_cli_writes_the_plan_and_exits_nonzero_when_it_does_not_fit(tmp_path):
    ok = _cli("--config=configs/c4_pretrain.py:tiny", "--topology=v5e:2x2", "--config.model.scan_layers=True",
              "--steps=train", f"--out={tmp_path / 'ok.json'}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    plan = json.loads((tmp_path / "ok.json").read_text())
    for key in ("topology", "chips", "device_kind", "hbm_bytes_per_chip", "mesh", "fits", "steps"):
        assert key in plan
    assert plan["command"].startswith("python -m train.plan --config=configs/c4_pretrain.py:tiny")
    assert plan["provenance"]["packages"]["libtpu"] and plan["provenance"]["machine"]["cores"] >= 1
    train = plan["steps"]["train"]
    for key in ("bytes_per_chip", "fits", "compile_s", "collectives", "xla_flops", "xla_bytes_accessed",
                "estimated_step_s", "bound", "model_flops_per_step", "estimated_mfu"):
        assert key in train
    assert set(train["bytes_per_chip"]) >= {"arguments", "outputs", "temp", "total"}
    assert 0 < train["estimated_mfu"] <= 1  # made in another process: checked here
    assert "| train |" in ok.stdout and "fits" in ok.stdout
    big = _cli("--config=configs/c4_pretrain.py:tiny", "--topology=v5e:2x2", "--config.model.scan_layers=True",
               "--steps=train", "--config.train.batch_size=262144", "--config.train.seq_len=128",
               f"--out={tmp_path / 'big.json'}")
    assert big.returncode == 1 and "DOES NOT FIT" in big.stdout and "grad_accum" in big.stdout
    assert json.loads((tmp_path / "big.json").read_text())["fits"] is False


@needs_libtpu
@pytest.mark.slow
def test_search_lists_fitting_candidates_best_first():
    from mora_jax.plan import search

    found = search.search(_config(train__batch_size=16), "v5e:2x2", budget=3, remat_policies=("none",))
    assert 1 <= len(found) <= 3 and found[0]["fits"]
    times = [r["estimated_step_s"] for r in found if r["fits"]]
    assert times == sorted(times)
    assert all(set(r["mesh"]) == {"data", "fsdp", "tensor"} for r in found)


def test_search_mesh_shapes_split_heads_and_batch():
    from mora_jax.models.config import LLAMA_CONFIGS
    from mora_jax.plan import search

    shapes = search.mesh_shapes(8, LLAMA_CONFIGS["tiny"], batch_size=8)  # 2 kv heads: tensor <= 2
    assert shapes[0] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert all(s["data"] * s["fsdp"] * s["tensor"] == 8 and s["tensor"] in (1, 2) for s in shapes)
    assert {"data": 2, "fsdp": 2, "tensor": 2} in shapes


def test_compare_methods_and_variants():
    from mora_jax.plan import report

    config = _config()
    assert report.compare_methods("mora", ["all"]) == ["lora", "full"]
    with pytest.raises(ValueError, match="unknown method"):
        report.compare_methods("mora", ["lora", "vera"])
    lora = report.with_method(config, "lora")
    assert lora.method == "lora" and lora.adapter.r == config.adapter.r and lora.adapter.targets == config.adapter.targets
    full = report.with_method(config, "full")
    assert full.remora.every == 0 and full.adapter.unfreeze == config.adapter.unfreeze
    assert dataclasses.replace(config).method == "mora"


# ----- the benchmark's TPU column (train.benchmark --topology) ---------------------------------------


def test_benchmark_methods_become_run_configs_for_the_slice():
    from configs import bench_tiny
    from mora_jax.bench import methods, tpu
    from mora_jax.bench.config import BenchConfig

    config = BenchConfig.from_config(bench_tiny.get_config()).run
    for spec in methods.method_specs([8], [1, 6]):
        run = tpu.run_config(config, spec, chips=4)
        assert run.method == spec.method and run.train.batch_size == 4 * config.train.batch_size
        assert run.model.dtype == "bfloat16" and run.mesh.axis_sizes == (1, -1, 1) and run.remora.every == 0
        assert getattr(run.adapter, "mora_type", None) == spec.mora_type


@needs_libtpu
@pytest.mark.slow
def test_benchmark_tpu_plan_sits_beside_the_cpu_rows():
    from configs import bench_tiny
    from mora_jax.bench import tpu
    from mora_jax.bench.config import BenchConfig

    c = bench_tiny.get_config()
    c.model.scan_layers = True
    config = BenchConfig.from_config(c).run
    rows = [{"method": "lora", "r": 8, "mora_type": None, "step_s": 0.01, "mfu": 0.1},
            {"method": "mora", "r": 8, "mora_type": 6, "step_s": 0.012, "mfu": 0.09}]
    result = {"results": rows, "tpu_plan": tpu.plan_methods(config, "v5e:2x2", rows, log=lambda m: None)}
    planned = result["tpu_plan"]["results"]
    assert [r["label"] for r in planned] == ["lora r=8", "mora6 r=8"]
    assert all(r["fits"] and r["bytes_per_chip"] > 0 and r["estimated_step_s"] > 0 for r in planned)
    table = tpu.side_by_side(result)
    assert "not measured" in table and "| mora6 r=8 | 12.0 ms |" in table


def test_hbm_bytes_by_op_says_which_pass_and_operation_moves_the_bytes():
    import jax
    import jax.numpy as jnp

    from mora_jax.plan.hlo_parse import _parse_instruction

    line = ('  %fusion.7 = bf16[8,1024,2560]{2,1,0} fusion(%p), kind=kLoop, calls=%fused_computation.7, '
            'metadata={op_name="jit(traced)/while/body/closed_call/transpose(jvp(LlamaForCausalLM))/model/while/'
            'body/closed_call/checkpoint/rematted_computation/layers/layers/mlp/mul"}')
    assert hlo.op_label(_parse_instruction(line)) == "recomputed: layers/mlp/mul"
    w, x = jnp.ones((64, 32)), jnp.ones((16, 64))
    text = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2))).lower(w, x).compile().as_text()
    stats = hlo.analyze(text)
    assert stats.hbm_bytes_by_op and sum(stats.hbm_bytes_by_op.values()) <= stats.hbm_bytes
    assert any(label.startswith("backward: ") for label in stats.hbm_bytes_by_op)
    assert any(label.startswith("forward: ") for label in stats.hbm_bytes_by_op)


# One layer of a stacked 4-bit weight as TPU HLO slices it inside a scanned loop: a fusion that
# relayouts the whole stack (a nested copy fusion) and takes one layer with a dynamic-slice. It
# computes the slice's elements only: 1/8 of the stack is read per trip, not all of it.
STACKED_SLICE_HLO = """HloModule jit_step, num_partitions=1

%copy_fusion (input: u4[8,256,128]) -> u4[8,256,128] {
  %input = u4[8,256,128]{2,1,0:T(64,128)(8,1)E(4)} parameter(0)
  ROOT %copy.1 = u4[8,256,128]{2,1,0:T(8,128)(8,1)E(4)} copy(%input)
}

%slice_layer (p0: u4[8,256,128], p1: s32[]) -> u4[256,128] {
  %p0 = u4[8,256,128]{2,1,0:T(64,128)(8,1)E(4)} parameter(0)
  %relayout = u4[8,256,128]{2,1,0:T(8,128)(8,1)E(4)} fusion(%p0), kind=kLoop, calls=%copy_fusion
  %p1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %ds = u4[1,256,128]{2,1,0} dynamic-slice(%relayout, %p1, %zero, %zero), dynamic_slice_sizes={1,256,128}
  ROOT %b = u4[256,128]{1,0} bitcast(%ds)
}

ENTRY %main (w: u4[8,256,128], i: s32[]) -> u4[256,128] {
  %w = u4[8,256,128]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  ROOT %layer = u4[256,128]{1,0} fusion(%w, %i), kind=kLoop, calls=%slice_layer
}
"""


def test_hlo_reads_one_layer_of_a_stack_sliced_through_a_relayout():
    stats = hlo.analyze(STACKED_SLICE_HLO)
    layer = 256 * 128 // 2  # u4: half a byte
    assert stats.code_hbm_bytes == layer  # not the whole stack of 8 layers
    assert stats.hbm_bytes == layer + layer + 4  # read the slice, write it, read the index


# A matmul fusion reading one lane-aligned window of its input, the slice in a nested fusion of its
# own (how TPU HLO fuses type 6's windowed chunks, and their gradients, into the dots): it reads the
# window, not the whole input.
WINDOW_DOT_HLO = """HloModule jit_step, num_partitions=1

%window (p: bf16[64,1024]) -> bf16[64,256] {
  %p = bf16[64,1024]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %s = bf16[64,256]{1,0:T(8,128)(2,1)} slice(%p), slice={[0:64], [384:640]}
}

%window_dot (x: bf16[64,1024], b: bf16[256,32]) -> bf16[64,32] {
  %x = bf16[64,1024]{1,0:T(8,128)(2,1)} parameter(0)
  %w = bf16[64,256]{1,0:T(8,128)(2,1)} fusion(%x), kind=kLoop, calls=%window
  %b = bf16[256,32]{1,0:T(8,128)(2,1)} parameter(1)
  ROOT %dot = bf16[64,32]{1,0:T(8,128)(2,1)} convolution(%w, %b), dim_labels=bf_io->bf
}

ENTRY %main (x: bf16[64,1024], b: bf16[256,32]) -> bf16[64,32] {
  %x = bf16[64,1024]{1,0} parameter(0)
  %b = bf16[256,32]{1,0} parameter(1)
  ROOT %y = bf16[64,32]{1,0} fusion(%x, %b), kind=kOutput, calls=%window_dot
}
"""


def test_hlo_matmul_reads_only_the_window_a_nested_slice_fusion_takes():
    stats = hlo.analyze(WINDOW_DOT_HLO)
    assert stats.hbm_bytes == 2 * (64 * 256 + 256 * 32 + 64 * 32)  # the window, the block, the output
    assert stats.matmul_flops == 2 * 64 * 32 * 256


@pytest.mark.parametrize("dtype, code_bytes", [("int4", 256 * 512 // 2), ("int8", 256 * 512)])
def test_hlo_counts_dequantization_and_the_integer_codes_read(dtype, code_bytes):
    """A quantized kernel's codes are read at their own width (4-bit: half a byte) and each element
    converted to a float counts as dequantization work."""
    import jax
    import jax.numpy as jnp

    from mora_jax.plan import roofline
    from mora_jax.plan.chips import CHIPS

    def step(q, scale, x):
        return x @ (q.astype(jnp.bfloat16) * scale)

    args = (jax.ShapeDtypeStruct((256, 512), jnp.dtype(dtype)), jax.ShapeDtypeStruct((1, 512), jnp.bfloat16),
            jax.ShapeDtypeStruct((8, 256), jnp.bfloat16))
    stats = hlo.analyze(jax.jit(step).lower(*args).compile().as_text())
    assert stats.dequant_elements == 256 * 512
    assert stats.code_hbm_bytes == code_bytes and stats.hbm_bytes > code_bytes
    estimate = roofline.estimate(stats, CHIPS["v5e"])["dequantize"]
    assert estimate["code_hbm_bytes"] == code_bytes
    assert estimate["elementwise_ops_per_matmul_flop"] == pytest.approx(2 * 256 * 512 / (2 * 8 * 256 * 512))
    plain = hlo.analyze(jax.jit(lambda w, x: x @ w).lower(jax.ShapeDtypeStruct((256, 512), jnp.bfloat16),
                                                          args[2]).compile().as_text())
    assert plain.dequant_elements == 0 and plain.code_hbm_bytes == 0
    assert "dequantize" not in roofline.estimate(plain, CHIPS["v5e"])


# ----- estimated MFU: the attention kernel's FLOPs and the FLOP model agree with what runs -----------------


@pytest.mark.parametrize("seq_len, block_size, causal, window", [
    (1024, None, True, None), (1000, None, True, None), (4096, None, True, None), (2048, 256, True, 300),
    (768, 128, False, None), (2048, 256, False, 300), (640, None, True, 64),
])
def test_flash_pairs_are_the_blocks_the_kernel_computes(seq_len, block_size, causal, window):
    """The planner's count of the attention kernel's work is the blocks the splash kernel's own mask
    processing keeps (a causal T = 2·block computes 3 of 4 blocks, not half)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as info_lib

    from mora_jax.models import attention

    padded = seq_len + (-seq_len % 128)
    block = block_size or next(b for b in (512, 256, 128) if padded % b == 0)
    shape = (padded, padded)
    if window is not None:
        mask = mask_lib.LocalMask(shape, window_size=(window - 1, 0 if causal else window - 1), offset=0)
    else:
        mask = mask_lib.CausalMask(shape) if causal else mask_lib.FullMask(shape)
    info, _ = info_lib.process_mask(mask_lib.MultiHeadMask([mask]), (block, block))
    blocks = int((info.block_mask > 0).sum()) if info.block_mask is not None else (padded // block) ** 2
    pairs = attention.flash_pairs(seq_len, causal=causal, sliding_window=window, block_size=block_size)
    assert pairs == blocks * block * block


def _layers_config(layers: int, seq_len: int, batch: int = 32, grad_accum: int = 1):
    config = _config("c4_pretrain", "250m", model__overrides__num_hidden_layers=layers, train__seq_len=seq_len,
                     train__batch_size=batch, train__grad_accum=grad_accum, model__scan_layers=False,
                     model__overrides__max_position_embeddings=max(seq_len, 1024))  # the context must fit
    from mora_jax.plan import planner

    return config, planner.model_config(config)


def test_attention_kernel_flops_count_every_layer_and_micro_batch():
    """A kernel call is one layer's attention on one micro-batch; the count once divided by the layers
    as well, so the roofline's compute time missed most of the attention (issue 22)."""
    from mora_jax.models.attention import flash_pairs
    from mora_jax.plan import planner

    for layers, grad_accum in ((4, 1), (2, 4)):
        config, llama = _layers_config(layers, 1024, grad_accum=grad_accum)
        calls = layers * grad_accum
        kernels = {"splash_mha_fwd_segmented_residuals": calls, "splash_mha_dq_segmented_no_residuals": calls,
                   "splash_mha_dkv_segmented_no_residuals": calls, "some_other_kernel": 7}
        per_chip = planner.attention_kernel_flops(config, llama, chips=4)(kernels)
        one_product = 2.0 * 32 * flash_pairs(1024) * llama.num_attention_heads * llama.resolved_head_dim
        assert flash_pairs(1024) == 3 * 1024 * 1024 // 4  # 512-blocks: 3 of 4 computed
        assert per_chip == pytest.approx(layers * (2 + 3 + 4) * one_product / 4)


@pytest.mark.parametrize("seq_len", [128, 1024, 4096, 32768])
def test_model_attention_flops_never_exceed_the_kernels(seq_len):
    """With the kernel (which skips masked blocks) the FLOP model counts the causal pairs, which its
    forward and backward products (6 per pair) never exceed the kernel's 9 per computed pair; counting
    all T² would exceed them from T = 4·block on, and with them the estimated MFU could pass 100%."""
    from mora_jax import flops
    from mora_jax.plan import planner

    config, llama = _layers_config(2, seq_len, batch=8)
    kernels = {"splash_mha_fwd": 2, "splash_mha_dq": 2, "splash_mha_dkv": 2}
    kernel = planner.attention_kernel_flops(config, llama, chips=1)(kernels)
    parts = flops.flop_breakdown(llama, 8, seq_len, "full", skip_masked_attention=True)
    needed = parts["attention_forward"] + parts["attention_backward"]
    assert needed <= kernel
    dense = flops.flop_breakdown(llama, 8, seq_len, "full")
    assert needed == pytest.approx((dense["attention_forward"] + dense["attention_backward"]) * (seq_len + 1)
                                   / (2 * seq_len))


def test_committed_plans_estimate_at_most_100_percent_mfu():
    found = 0
    for path in sorted((ROOT / "benchmarks").rglob("*.json")):
        text = path.read_text()
        if '"estimated_mfu"' not in text:
            continue

        def walk(node, where):
            nonlocal found
            if isinstance(node, dict):
                if node.get("estimated_mfu") is not None:
                    found += 1
                    assert 0 < node["estimated_mfu"] <= 1, f"{path.relative_to(ROOT)}{where}: {node['estimated_mfu']}"
                for key, value in node.items():
                    walk(value, f"{where}/{key}")
            elif isinstance(node, list):
                for i, value in enumerate(node):
                    walk(value, f"{where}/{i}")

        walk(json.loads(text), "")
    assert found >= 4


def test_advice_for_a_70b_step_names_checkpoints_scales_quantization_and_chunked_loss():
    """A 70B step that does not fit: the first line says how much of it the remat checkpoints are;
    the changes offered include bf16 scales for a 4-bit base, quantizing a float base, chunked loss."""
    from mora_jax.plan import advice

    GiB = chips.GiB

    def plan(frozen_by_dtype):
        return {"hbm_bytes_per_chip": 16 * GiB, "chips": 4, "topology": "v5e:2x2",
                "mesh": {"data": 1, "fsdp": 4, "tensor": 1},
                "run": {"layers": 80, "per_chip_micro_batch": 1, "hidden_size": 8192, "vocab_size": 128256},
                "state_bytes_per_chip": {"frozen": sum(frozen_by_dtype.values()), "frozen_by_dtype": frozen_by_dtype},
                "steps": {"train": {"fits": False, "compiled": False,
                                    "bytes_per_chip": {"total": 31 * GiB, "temp": 21 * GiB, "arguments": 10 * GiB}}}}

    nf4 = _config("math_finetune", "llama31_70b_tpu", model__quantize__format="nf4")
    tips = advice.suggestions(plan({"uint4": 8 * GiB, "float32": GiB, "bfloat16": GiB}), nf4)
    assert tips[0].startswith("needs 31.0 GiB per chip of 16.0 GiB") and "5.0 GiB of it the layers' remat" in tips[0]
    assert any("quantize.scale_dtype=bfloat16" in t for t in tips)
    assert not any("loss_chunk" in t for t in tips)  # the variant chunks its loss already
    bf16 = _config("math_finetune", "llama31_70b_tpu", train__loss_chunk=0)
    tips = advice.suggestions(plan({"bfloat16": 33 * GiB}), bf16)
    assert any(t.startswith("--config.model.quantize.format=int8") for t in tips)
    assert any(t.startswith("--config.train.loss_chunk=512") for t in tips)
