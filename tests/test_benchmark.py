"""The benchmark harness: FLOP counting against hand-computed numbers, and a smoke run on the tiny model.

Timings are noisy: nothing here asserts a timing ratio or threshold, only that the harness runs,
writes the documented schema and produces sane (positive, finite) values.
"""

import ast
import json
import math
import pathlib
import subprocess
import sys

import ml_collections
import pytest

import mora_jax as mj

from configs import bench_tiny
from mora_jax import assembly, flops, xla_tuning
from mora_jax import steps as steps_lib
from mora_jax.bench import harness, methods, peer, report, runners
from mora_jax.bench.config import BenchConfig
from mora_jax.models.config import LLAMA_CONFIGS

TINY = LLAMA_CONFIGS["tiny"]  # D=64, F=172, L=2, N=4 heads, K=2 kv heads, H=16, V=256


# ---------------------------------------------------------------------------------------------
# FLOP count, by hand for the tiny model at batch 2 x seq 8 (16 tokens).
#   per block: q 64*64=4096, k 64*32=2048, v 2048, o 4096, gate/up/down 64*172=11008 each -> 45312
#   2 blocks 90624 + LM head 64*256=16384 -> 107008 matmul params
#   forward 2*107008*16 = 3,424,256
#   attention forward 2 layers * 4*B*T^2*N*H = 2*4*2*64*4*16 = 65,536; backward twice that
#   input grads: forward minus layer 0's q/k/v (64*128=8192 params): 2*(107008-8192)*16 = 3,162,112
#   weight grads (full only): 2*90624*16 = 2,899,968
# ---------------------------------------------------------------------------------------------
FROZEN = 3_424_256 + 65_536 + 3_162_112 + 131_072  # = 6,782,976
FULL = FROZEN + 2_899_968  # = 9,682,944


def test_flops_frozen_and_full_by_hand():
    assert flops.model_flops_per_step(TINY, 2, 8, "frozen") == FROZEN == 6_782_976
    assert flops.model_flops_per_step(TINY, 2, 8, "full") == FULL == 9_682_944
    parts = flops.flop_breakdown(TINY, 2, 8, "full")
    assert parts == {"forward": 3_424_256, "attention_forward": 65_536, "input_grad": 3_162_112,
                     "attention_backward": 131_072, "weight_grad": 2_899_968, "adapter": 0}


def test_full_and_frozen_differ_by_exactly_the_weight_gradient():
    for b, t in ((1, 1), (2, 8), (3, 17)):
        diff = flops.model_flops_per_step(TINY, b, t, "full") - flops.model_flops_per_step(TINY, b, t, "frozen")
        assert diff == 2 * 90_624 * b * t  # 2 x (trained block params) x tokens
    cfg = LLAMA_CONFIGS["mora-250m"]
    diff = flops.model_flops_per_step(cfg, 1, 256, "full") - flops.model_flops_per_step(cfg, 1, 256, "frozen")
    block = 4 * 768 * 768 + 3 * 768 * 2560
    assert diff == 2 * 24 * block * 256


def test_textbook_formula_without_dead_gradients():
    # skip_dead_input_grads=False: input gradient of every kernel, the brief's plain formula
    plain = flops.model_flops_per_step(TINY, 2, 8, "frozen", skip_dead_input_grads=False)
    assert plain == 2 * 3_424_256 + 3 * 65_536 == 7_045_120  # forward + every input gradient + attention x3
    assert plain - FROZEN == 2 * 8192 * 16


def test_lora_flops_by_hand():
    # per token and layer: 2*r*(k+d) = 16*(128 + 96 + 96 + 128 + 236*3) = 18,496; x3 (fwd + bwd), x2 layers
    # minus layer 0's q/k/v input gradient 2*k*r = 2*64*8 each
    adapter = 16 * (18_496 * 3 * 2 - 3 * 2 * 64 * 8)
    assert adapter == 1_726_464
    assert flops.model_flops_per_step(TINY, 2, 8, "lora", 8) == FROZEN + adapter
    plain = flops.model_flops_per_step(TINY, 2, 8, "lora", 8, skip_dead_input_grads=False)
    assert plain - (FROZEN + 2 * 8192 * 16) == 16 * 18_496 * 3 * 2 == 1_775_616


def test_mora_flops_by_hand():
    # type 1, r=8: r_hat = round(sqrt((k+d)*8)): q 32, k 28, v 28, o 32, mlp 43 (sqrt(1888)=43.45)
    per_layer = 2 * (32**2 + 28**2 + 28**2 + 32**2 + 3 * 43**2)  # 18,326 per token
    adapter = 16 * (per_layer * 3 * 2 - 2 * (32**2 + 28**2 + 28**2))
    assert adapter == 1_676_352
    assert flops.model_flops_per_step(TINY, 2, 8, "mora", 8, 1) == FROZEN + adapter
    # type 6: even r_hat (k/v 28, mlp 42); 2·r_hat·W per token for the W = min(d, ceil(k/r_hat)·r_hat)
    # product columns that reach the output: q/o 64 (two whole chunks), k/v 32 (of three chunks' 84:
    # the second chunk's first 4 columns), gate/up 84 (tiled to 172), down 64 (of five chunks' 210)
    assert flops.mora_columns_used(64, 32, 28) == 32
    assert flops.mora_columns_used(64, 172, 42) == 84
    assert flops.mora_columns_used(172, 64, 42) == 64
    assert flops.mora_columns_used(4096, 11008, 346) == 12 * 346
    per_layer6 = 2 * (32 * 64 + 28 * 32 + 28 * 32 + 32 * 64 + 2 * 42 * 84 + 42 * 64)  # 31,264
    adapter6 = 16 * (per_layer6 * 3 * 2 - 2 * (32 * 64 + 28 * 32 + 28 * 32))
    assert flops.model_flops_per_step(TINY, 2, 8, "mora", 8, 6) == FROZEN + adapter6


def test_flops_errors():
    with pytest.raises(ValueError, match="method"):
        flops.model_flops_per_step(TINY, 1, 1, "vera")
    with pytest.raises(ValueError, match="rank"):
        flops.model_flops_per_step(TINY, 1, 1, "lora")
    with pytest.raises(ValueError, match="mora_type"):
        flops.model_flops_per_step(TINY, 1, 1, "mora", 8)


# ---------------------------------------------------------------------------------------------
# The runners time the loop's own steps; the library does not import its benchmarks.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    base = runners.assemble(BenchConfig.from_config(bench_tiny.get_config()).run)
    assert base.model_config == TINY
    return base, base.load_params()


@pytest.mark.parametrize("tuned", [True, False])
def test_step_runner_runs_the_builders_train_step(tiny_model, tuned):
    import jax

    base, params = tiny_model
    runner = runners.StepRunner(methods.MethodSpec("mora", 8, 6), base, params, methods.make_batch(TINY, 2, 16),
                                tuned=tuned)
    assert isinstance(runner.steps, steps_lib.Steps)
    want = xla_tuning.train_step_compiler_options(jax.default_backend()) if tuned else None
    assert runner.compiler_options == runner.steps.compiler_options == want
    before = runner.state
    runner.step()
    frozen = jax.tree_util.tree_leaves(before.frozen)
    assert not any(x.is_deleted() for x in frozen + jax.tree_util.tree_leaves(params))  # passed through
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(before.trainables))  # donated, updated in place
    assert int(runner.state.step) == 1 and math.isfinite(float(runner.last_loss))


def test_merge_runner_donates_a_private_copy_of_the_frozen_weights(tiny_model):
    import jax

    base, params = tiny_model
    runner = runners.MergeRunner(methods.MethodSpec("mora", 8, 1), base, params)
    assert runner.steps.owns_frozen(runner.state)
    before = jax.tree_util.tree_leaves(runner.state.frozen)
    for _ in range(2):
        runner.step()
    assert all(x.is_deleted() for x in before)  # merged in place
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(params))  # the caller's weights untouched
    assert runner.steps.owns_frozen(runner.state)


def test_the_core_package_never_imports_the_benchmarks():
    package = pathlib.Path(__file__).resolve().parents[1] / "mora_jax"
    offenders = []
    for path in package.rglob("*.py"):
        if "bench" in path.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names] if node.level == 0 else [
                    f"{'.' * node.level}{node.module or ''}.{a.name}" for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("mora_jax.bench") or ".bench" in n]
    assert offenders == []


def test_bench_modules_stay_small():
    bench = pathlib.Path(__file__).resolve().parents[1] / "mora_jax" / "bench"
    sizes = {p.name: len(p.read_text().splitlines()) for p in bench.glob("*.py")}
    assert {"config.py", "harness.py", "methods.py", "peer.py", "profile.py", "report.py", "runners.py"} <= set(sizes)
    assert max(sizes.values()) <= 450, sizes


# ---------------------------------------------------------------------------------------------
# The harness on the tiny model.
# ---------------------------------------------------------------------------------------------


def _quick_config():
    c = bench_tiny.get_config()
    c.train.batch_size, c.train.seq_len = 2, 16
    b = c.benchmark
    b.r_large = 16
    b.steps, b.warmup = 2, 1
    b.matmul_size, b.matmul_chain, b.matmul_repeats = 256, 2, 2
    b.delta_weight.in_features, b.delta_weight.out_features, b.delta_weight.repeats = 256, 512, 2
    return c


@pytest.fixture(scope="module")
def result():
    return harness.run_benchmark(_quick_config(), log=lambda _: None)


def test_harness_writes_the_schema(result, tmp_path):
    path = report.write_json(result, tmp_path / "results.json")
    data = json.loads(path.read_text())  # valid JSON, no NaN/inf
    report.validate_schema(data)
    for key in report.SCHEMA_TOP:
        assert key in data
    assert set(data["model"]) == {"name", "params", "batch", "seq_len"}
    assert set(data["merge"]) == {"step_s", "merge_s"}
    assert isinstance(data["device"], str) and data["dtype"] == "float32"
    assert data["model"] == {"name": "tiny", "params": data["model"]["params"], "batch": 2, "seq_len": 16}
    assert data["model"]["params"] == 123_712
    rows = [(row["method"], row["r"], row["mora_type"]) for row in data["results"]]
    assert rows == [("full", None, None), ("lora", 8, None), ("mora", 8, 1), ("mora", 8, 6),
                       ("lora", 16, None), ("mora", 16, 1), ("mora", 16, 6)]
    for row in data["results"]:
        assert set(row) == set(report.SCHEMA_ROW)
        assert row["step_s"] > 0 and math.isfinite(row["step_s"])
        assert row["tokens_per_s"] == pytest.approx(32 / row["step_s"])
        assert row["model_flops_per_step"] == flops.model_flops_per_step(
            LLAMA_CONFIGS["tiny"], 2, 16, row["method"], row["r"], row["mora_type"])
        assert 0 < row["mfu"] < 1.5
        assert row["mfu"] == pytest.approx(row["model_flops_per_step"] / row["step_s"] / data["peak_matmul_flops"])
        assert row["peak_mem_bytes"] is None or row["peak_mem_bytes"] > 0
    assert data["peak_matmul_flops"] > 0
    assert data["merge"]["merge_s"] > 0 and data["merge"]["step_s"] > 0
    mora1_large = next(r for r in data["results"] if r["method"] == "mora" and r["r"] == 16 and r["mora_type"] == 1)
    assert data["merge"]["step_s"] == mora1_large["step_s"]  # the merge is compared with its own MoRA step


def test_harness_extras(result):
    assert set(result["ratios"]["step"]) >= {"mora1_r8/lora_r8", "mora6_r16/lora_r16", "mora6_r8/full"}
    assert all(v > 0 for v in result["ratios"]["step"].values())
    for detail in result["details"]:
        assert math.isfinite(detail["loss"])  # the step really trains
        assert detail["compile_s"] > 0 and len(detail["step_s_all"]) == 2
    dw = result["delta_weight"]
    assert dw["fill_s"] > 0 and [t["mora_type"] for t in dw["types"]] == [1, 6]
    assert all(t["delta_weight_s"] > 0 and t["ratio_to_fill"] > 0 for t in dw["types"])
    assert all(t["met"] in (True, False, None) for t in result["targets"].values())
    text = report.report(result)
    assert "mora" in text and "merge" in text
    assert report.report(result, markdown=True).count("|") > 20


def test_memory_is_measured_on_cpu(result):
    # XLA's CPU backend implements memory_analysis(): full fine-tuning holds float32 copies of the
    # trained kernels, their gradients and two Adam moments, so it needs more than MoRA at r=8.
    rows = {(r["method"], r["r"], r["mora_type"]): r for r in result["results"]}
    assert all(r["peak_mem_bytes"] for r in rows.values())
    assert result["details"][0]["memory"]["argument_bytes"] > 0


def test_validate_schema_rejects_extra_row_keys(result):
    bad = json.loads(json.dumps(result))
    bad["results"][0]["extra"] = 1
    with pytest.raises(ValueError, match="row keys"):
        report.validate_schema(bad)


@pytest.mark.slow  # about 70 s on two cores: 15 compiled steps
def test_scaling_runs_and_writes_markdown_and_plot(tmp_path):
    c = _quick_config()
    b = c.benchmark
    b.mora_types, b.peft_methods = (6,), ("hira", "mora_mag")
    # 15 compiled steps: 5 methods at one sequence length, one batch, and full + LoRA/MoRA/HiRA at one rank
    b.scaling.seq_lens, b.scaling.batches, b.scaling.ranks = (8,), (1,), (4,)
    b.scaling.kernel_sizes = ((64, 128), (128, 256))
    b.scaling.steps, b.scaling.warmup, b.scaling.repeats = 1, 0, 1
    logged = []
    scaling = harness.run_scaling(c, log=logged.append)
    assert len(scaling["vs_seq_len"]) == 5 and len(scaling["vs_batch"]) == 5
    assert len(scaling["vs_rank"]) == 1 + 4 and len(scaling["vs_kernel_size"]) == 2
    assert {r["method"] for r in scaling["vs_rank"]} == {"full", "lora", "mora", "hira", "mora_mag"}
    assert sum(" seq " in line for line in logged) == 15  # each sweep times its own points, interleaved
    assert all(row["step_s"] > 0 for key in ("vs_seq_len", "vs_batch", "vs_rank") for row in scaling[key])
    json.loads(report.write_json(scaling, tmp_path / "s.json").read_text())
    text = report.scaling_markdown(scaling)
    assert "vs rank" in text and "| 128x256 |" in text and "vs batch" in text
    assert "| hira/lora |" in text and "| mora6/full |" in text and "| hira r=8 |" in text
    assert "| mora_mag6/lora |" in text and "| mora6+mag r=8 |" in text
    png = report.plot_scaling(scaling, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_peer_without_torch_names_the_pip_command(tmp_path):
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch is installed")
    proc = subprocess.run(
        [sys.executable, "-m", "train.benchmark", "--config", "configs/bench_tiny.py", "--peer",
         "--out", str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120,
        cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert proc.returncode != 0
    assert peer.PEER_INSTALL in proc.stderr
    assert not (tmp_path / "p.json").exists()


def test_configs_have_the_documented_fields():
    import importlib

    for name, r_large in (("bench_tiny", 32), ("bench_250m", 128), ("bench_1b", 256), ("bench_smollm2", 8)):
        c = importlib.import_module(f"configs.{name}").get_config()
        assert isinstance(c, ml_collections.ConfigDict)
        assert c.benchmark.r_small == 8 and c.benchmark.r_large == r_large
        for section, field in (("model", "preset"), ("train", "batch_size"), ("train", "seq_len"), ("model", "dtype"),
                               ("benchmark", "steps"), ("benchmark", "warmup")):
            assert field in c[section]
        assert c.model.preset in LLAMA_CONFIGS
        bench = BenchConfig.from_config(c)  # a run config (RunConfig.from_dict, strict) plus the benchmark section
        assert (bench.r_small, bench.r_large) == (8, r_large) and bench.run.model.preset == c.model.preset


@pytest.mark.torch
def test_peer_rows_with_hf_peft():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    c = _quick_config()
    c.benchmark.steps, c.benchmark.warmup = 1, 1
    bench = BenchConfig.from_config(c)
    llama_config = assembly.model_config(bench.run)
    rows = peer.run_peer(bench, llama_config, methods.make_batch(llama_config, 2, 16), 1e11, log=lambda _: None)
    assert [(row["method"], row["r"], row["mora_type"]) for row in rows] == [
        ("full", None, None), ("lora", 8, None), ("mora", 8, 1), ("mora", 8, 6),
        ("lora", 16, None), ("mora", 16, 1), ("mora", 16, 6)]
    for row in rows:
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] > 0
        assert row["model_flops_per_step"] == flops.model_flops_per_step(
            llama_config, 2, 16, row["method"], row["r"], row["mora_type"])


@pytest.mark.torch
@pytest.mark.parametrize("mora_type", [1, 6])
@pytest.mark.parametrize("k,d,r", [(48, 80, 4), (80, 48, 4), (64, 64, 16), (16, 96, 30)])
def test_torch_mora_layer_is_the_same_method(mora_type, k, d, r):
    """The peer's eager PyTorch MoRA layer computes apply_mora's Δy (so the timings compare the
    same method), including a wrap pad longer than the input (r̂ > 2k) and tiled outputs."""
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    import numpy as np

    from mora_jax import ops

    base = torch.nn.Linear(k, d, bias=False)
    layer = peer.torch_mora_linear_class()(base, r, mora_type)
    rng = np.random.default_rng(0)
    m = rng.standard_normal((layer.r_hat, layer.r_hat)).astype(np.float32)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    with torch.no_grad():
        layer.m.copy_(torch.from_numpy(m))
        got = layer.delta(torch.from_numpy(x)).numpy()
        y = layer(torch.from_numpy(x)).numpy()
    want = np.asarray(ops.apply_mora(jnp.asarray(x), jnp.asarray(m), in_features=k, out_features=d, mora_type=mora_type))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, want + x @ base.weight.detach().numpy().T, rtol=1e-4, atol=1e-4)


@pytest.mark.torch
def test_add_torch_mora_trains_only_m():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    llama_config = assembly.model_config(BenchConfig.from_config(_quick_config()).run)
    hf = llama_config.to_hf_dict()
    hf.pop("architectures", None)
    hf.pop("model_type", None)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    wrapped = peer.add_torch_mora(model, 8, 6)
    assert wrapped == 7 * llama_config.num_hidden_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".m") for n in trainable)
    ids = torch.zeros((1, 8), dtype=torch.long)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


def test_peer_comparison_and_its_targets(result):
    fake = json.loads(json.dumps(result))
    peer_row = {"framework": "torch", "step_s": 1.0, "mfu": 0.5, "torch_peak_matmul_flops": 1e11, "mfu_vs_torch_peak": 0.5}
    fake["peer"] = [{**peer_row, "method": "lora", "r": 8, "mora_type": None, "tokens_per_s": 10.0},
                    {**peer_row, "method": "mora", "r": 8, "mora_type": 6, "tokens_per_s": 1e12}]
    fake["peer_comparison"] = peer.peer_comparison(fake)
    ours = {(r["method"], r["r"], r["mora_type"]): r["tokens_per_s"] for r in fake["results"]}
    assert [(c["method"], c["r"], c["mora_type"]) for c in fake["peer_comparison"]] == [("lora", 8, None), ("mora", 8, 6)]
    assert fake["peer_comparison"][0]["speedup"] == pytest.approx(ours["lora", 8, None] / 10.0)
    targets = harness.check_targets(fake)
    assert targets["f: lora_r8 tokens/s / PyTorch's"]["met"] is (ours["lora", 8, None] / 10.0 >= 1.2)
    assert targets["f: mora6_r8 tokens/s / PyTorch's"]["met"] is False
    assert "speed-up" in report.report(fake)


def test_xla_tuning_ablation_is_reported(result):
    tuning = result["xla_tuning"]
    assert tuning["compiler_options"] == xla_tuning.CPU_TRAIN_STEP_OPTIONS
    assert [row["label"] for row in tuning["ablation"]] == ["lora r=8", "mora1 r=8", "mora6 r=8"]
    for row in tuning["ablation"]:
        assert row["step_s_untuned"] > 0 and row["tuned_over_untuned"] == pytest.approx(row["step_s_tuned"] / row["step_s_untuned"])
    assert "XLA tuning" in report.report(result)


def test_accelerator_config_runs_in_bfloat16_on_a_shrunk_model():
    """The H200 command (configs/bench_1b.py: bfloat16, scanned layers, dots-saveable remat,
    r=8/256) runs end to end; only the model's widths and the batch are shrunk for a CPU."""
    from configs import bench_1b

    c = bench_1b.get_config()
    c.model.overrides.update({"hidden_size": 64, "intermediate_size": 172, "num_attention_heads": 4, "vocab_size": 256})
    c.model.overrides.num_hidden_layers = 2
    c.train.batch_size, c.train.seq_len, c.benchmark.steps, c.benchmark.warmup = 2, 32, 1, 1
    c.benchmark.matmul_size, c.benchmark.matmul_chain, c.benchmark.matmul_repeats = 256, 2, 1
    c.benchmark.xla_tuning_ablation = False
    c.benchmark.delta_weight.enabled = False
    result = harness.run_benchmark(c, log=lambda _: None)
    report.validate_schema(json.loads(json.dumps(result)))
    assert result["dtype"] == "bfloat16"
    assert [(r["method"], r["r"]) for r in result["results"]][:2] == [("full", None), ("lora", 8)]
    assert {r["r"] for r in result["results"] if r["r"]} == {8, 256}
    assert all(math.isfinite(d["loss"]) for d in result["details"])
    assert result["merge"]["merge_s"] > 0


# ---------------------------------------------------------------------------------------------
# A benchmark config is a run config plus one benchmark section.
# ---------------------------------------------------------------------------------------------


def test_bench_config_is_a_run_config_plus_a_strict_benchmark_section():
    from configs import base, bench_smollm2

    c = bench_smollm2.get_config()
    bench = BenchConfig.from_config(c)
    assert bench.run.model.preset == "smollm2-135m" and bench.run.model.dtype == "float32"
    assert (bench.run.train.batch_size, bench.run.train.seq_len) == (8, 64)
    assert bench.ranks == (8,) and bench.delta_weight.in_features == 576 and bench.peer.attention == "sdpa"
    assert assembly.model_config(bench.run) == LLAMA_CONFIGS["smollm2-135m"]  # the one model-building path
    assert [s.label for s in peer.peer_specs(bench)] == ["lora r=8", "mora1 r=8", "mora6 r=8"]  # benchmark.full=False
    c.benchmark.full, c.benchmark.mora_types = True, ()
    assert [s.label for s in peer.peer_specs(BenchConfig.from_config(c))] == ["full", "lora r=8"]
    c.benchmark.stepz = 3
    with pytest.raises(ValueError, match=r"config.benchmark has no field\(s\) \['stepz'\]"):
        BenchConfig.from_config(c)
    c = bench_tiny.get_config()
    c.benchmark.peer.threadz = 1
    with pytest.raises(ValueError, match=r"config.benchmark.peer has no field\(s\) \['threadz'\]"):
        BenchConfig.from_config(c)
    c = bench_tiny.get_config()
    c.batch = 8  # the old second schema's field: RunConfig.from_dict stays strict
    with pytest.raises(ValueError, match=r"config has no field\(s\) \['batch'\]"):
        BenchConfig.from_config(c)
    # Any run config is benchmarked with the section's defaults.
    plain = BenchConfig.from_config(base.base_config())
    assert plain.steps == BenchConfig().steps and plain.run.model.preset == "tiny"


def test_each_method_is_the_run_with_its_adapter():
    run = BenchConfig.from_config(bench_tiny.get_config()).run
    for spec in methods.method_specs([8, 32], [1, 6]):
        method = spec.run_config(run)
        assert method.method == spec.method and method.adapter == spec.adapter_config()
        assert method.remora.every == 0 and method.model == run.model and method.train == run.train
    assert methods.model_name(run) == "tiny"


def test_smollm2_preset_is_the_public_checkpoints_shape():
    from mora_jax.models.config import LlamaConfig

    # SmolLM2-135M-Instruct's config.json (LlamaForCausalLM), the fields that shape the model
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
          "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
          "tie_word_embeddings": True, "rope_theta": 100000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu", "rope_scaling": None}
    assert LlamaConfig.from_hf_dict(hf) == LLAMA_CONFIGS["smollm2-135m"].replace(head_dim=None)
    assert LLAMA_CONFIGS["smollm2-135m"].resolved_head_dim == 64


def test_benchmark_takes_a_checkpoint_directory(fixtures_dir):
    """--config.model.hf_path=DIR: the shape from its config.json, its weights loaded, the run's
    methods timed on it (the same path as a preset)."""
    c = _quick_config()
    c.model.hf_path = str(fixtures_dir / "e2e_public" / "base")
    b = c.benchmark
    b.r_large, b.mora_types, b.steps, b.warmup = 8, (6,), 1, 0
    b.xla_tuning_ablation, b.delta_weight.enabled, b.merge_type = False, False, 6
    result = harness.run_benchmark(c, log=lambda _: None)
    report.validate_schema(json.loads(json.dumps(result)))
    assert result["model"]["name"] == c.model.hf_path and result["model"]["params"] == 123_712
    assert [(r["method"], r["r"], r["mora_type"]) for r in result["results"]] == [
        ("full", None, None), ("lora", 8, None), ("mora", 8, 6)]
    assert all(math.isfinite(d["loss"]) for d in result["details"])


@pytest.mark.torch
def test_peer_in_the_same_rotation_and_its_generation():
    """--peer: the PyTorch methods are timed in mora-jax's rotation (the same number of steps), both
    frameworks' matmul peaks sit beside the ratios, and generation is timed in both."""
    pytest.importorskip("peft")
    c = _quick_config()
    b = c.benchmark
    b.r_large, b.mora_types, b.steps, b.warmup = 8, (1,), 2, 0
    b.xla_tuning_ablation, b.delta_weight.enabled = False, False
    b.generation.batches, b.generation.prompt_len, b.generation.new_tokens, b.generation.repeats = (2,), 8, 4, 1
    result = harness.run_benchmark(c, with_peer=True, log=lambda _: None)
    assert [(p["method"], p["r"], p["mora_type"]) for p in result["peer"]] == [
        ("full", None, None), ("lora", 8, None), ("mora", 8, 1)]
    assert all(len(p["step_s_all"]) == 2 and "sdpa" in p["framework"] for p in result["peer"])
    comparison = {(c_["method"], c_["mora_type"]): c_ for c_ in result["peer_comparison"]}
    ours = {(r["method"], r["mora_type"]): r for r in result["results"]}
    lora = next(p for p in result["peer"] if p["method"] == "lora")
    assert comparison["mora", 1]["step_over_peft_lora"] == pytest.approx(ours["mora", 1]["step_s"] / lora["step_s"])
    assert comparison["full", None]["peak_ratio"] == pytest.approx(
        result["peak_matmul_flops"] / result["peer"][0]["torch_peak_matmul_flops"])
    assert result["targets"]["g: mora1_r8 step / PyTorch PEFT lora_r8 step"]["met"] in (True, False)
    gen = result["peer_generation"]
    assert [(row["framework"][:5], row["batch"]) for row in gen["rows"]] == [("mora-", 2), ("torch", 2)]
    for row in gen["rows"]:
        assert row["generate_new_tokens_per_s"] == pytest.approx(2 * 4 / row["generate_s"])
    assert gen["ratios"][0]["generate_speedup"] == pytest.approx(
        gen["rows"][0]["generate_new_tokens_per_s"] / gen["rows"][1]["generate_new_tokens_per_s"])
    text = report.report(result)
    assert "PyTorch" in text and "GFLOP/s" in text and "generate new tok/s" in text


def test_step_variants_time_the_runs_own_step_beside_its_variants():
    from mora_jax.bench import variants

    c = bench_tiny.get_config()
    c.train.batch_size, c.train.seq_len, c.train.grad_accum = 4, 16, 2
    c.adapter.dropout = 0.1
    chosen = [variants.Variant("run"), variants.Variant.parse("one batch: train.grad_accum=1 adapter.dropout=0.0"),
              variants.Variant.parse("small vocab: model.overrides.vocab_size=64")]
    runs = variants.variant_runs(c, chosen)
    assert [r.train.grad_accum for _, r in runs] == [2, 1, 2] and runs[2][1].model.overrides == {"vocab_size": 64}
    result = variants.run_variants(runs, steps=1, warmup=0, log=lambda _: None)
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["run", "one batch", "small vocab"] and rows[0]["over_first"] == 1.0
    assert rows[0]["positions"] == rows[0]["loss_tokens"] == 64 and result["pipeline"] is None
    assert all(r["step_s"] > 0 and math.isfinite(r["loss"]) for r in rows)
    assert "(the run as given)" in variants.variants_markdown(result)
    with pytest.raises(ValueError, match="NAME: field=value"):
        variants.Variant.parse("model.dtype=float32")
    with pytest.raises(ValueError, match=r"config.train has no field\(s\) \['stepz'\]"):
        variants.variant_runs(c, [variants.Variant.parse("bad: train.stepz=3")])


def test_targets_without_full_fine_tuning(result):
    fake = json.loads(json.dumps(result))
    fake["results"] = [r for r in fake["results"] if r["method"] != "full"]
    targets = harness.check_targets(fake)
    assert targets and not any(name.startswith(("b:", "d:")) for name in targets)
    assert "a: mora1_r8 step / lora step" in targets


# ---------------------------------------------------------------------------------------------
# The PEFT family (DoRA, PiSSA, HiRA) beside LoRA: benchmark.peft_methods.
# ---------------------------------------------------------------------------------------------


def test_peft_family_specs_round_trip_and_build_their_configs():
    from mora_jax.methods import LLAMA_TARGETS, DoRAConfig, HiRAConfig, PiSSAConfig

    specs = methods.method_specs([8, 32], [6], include_full=True, peft_methods=("dora", "pissa", "hira"))
    assert [s.label for s in specs] == ["full", "lora r=8", "mora6 r=8", "dora r=8", "pissa r=8", "hira r=8",
                                        "lora r=32", "mora6 r=32"]
    assert [s.tag for s in specs] == ["full", "lora_r8", "mora6_r8", "dora_r8", "pissa_r8", "hira_r8", "lora_r32",
                                      "mora6_r32"]
    for spec in specs:
        assert methods.MethodSpec.from_label(spec.label) == spec
    mag = methods.method_specs([8], [1], include_full=False, peft_methods=("mora_mag",))[-1]
    assert (mag.label, mag.tag, mag.flops_method) == ("mora6+mag r=8", "mora6mag_r8", "mora")
    assert methods.MethodSpec.from_label("mora6+mag r=8") == mag
    assert mag.adapter_config() == mj.MoRAConfig(r=8, mora_type=6, targets=(LLAMA_TARGETS,), magnitude=True)
    # its target: against MoRA of its type at its rank, with DoRA's limit
    rows = [{"method": "lora", "r": 8, "mora_type": None, "step_s": 1.0},
            {"method": "mora", "r": 8, "mora_type": 6, "step_s": 1.1},
            {"method": "mora_mag", "r": 8, "mora_type": 6, "step_s": 1.21}]
    found = {}
    harness._peft_family_targets({"results": rows}, {8: rows[0]},
                                 lambda name, value, limit: found.setdefault(name, (value, limit)))
    assert found == {"h: mora6mag_r8 step / mora6_r8 step": (pytest.approx(1.1), 1.25)}
    dora, pissa, hira = (methods.MethodSpec(m, 8).adapter_config() for m in ("dora", "pissa", "hira"))
    assert dora == DoRAConfig(r=8, alpha=methods.LORA_ALPHA, targets=(LLAMA_TARGETS,))
    assert pissa == PiSSAConfig(r=8, alpha=methods.LORA_ALPHA, targets=(LLAMA_TARGETS,), niter=methods.PISSA_NITER)
    assert hira == HiRAConfig(r=8, targets=(LLAMA_TARGETS,))
    run = BenchConfig.from_config(bench_tiny.get_config()).run
    assert [s.run_config(run).method for s in specs[3:6]] == ["dora", "pissa", "hira"]
    with pytest.raises(ValueError, match="lora, dora, pissa or hira"):
        methods.MethodSpec.from_label("vera r=8")
    c = bench_tiny.get_config()
    assert BenchConfig.from_config(c).peft_methods == ()
    c.benchmark.peft_methods = ["hira", "dora"]  # a list from a config file is a tuple
    assert BenchConfig.from_config(c).peft_methods == ("hira", "dora")
    c.benchmark.peft_methods = ("dora", "lora")
    with pytest.raises(ValueError, match=r"benchmark.peft_methods=\('dora', 'lora'\): give a tuple of methods among"):
        BenchConfig.from_config(c)


def _peft_family_config():
    c = _quick_config()
    b = c.benchmark
    b.r_large, b.mora_types, b.full, b.peft_methods = 8, (), False, ("dora", "pissa", "hira")
    b.steps, b.warmup, b.xla_tuning_ablation, b.delta_weight.enabled = 2, 0, False, False
    b.merge_type, b.peer.generation = 6, False
    return c


def test_peft_family_in_the_harness():
    """DoRA, PiSSA and HiRA are timed beside LoRA at r_small with the FLOP model's counts, their
    ratios to LoRA and their targets (HiRA's limit is 1.05 x its FLOP floor over LoRA)."""
    result = harness.run_benchmark(_peft_family_config(), log=lambda _: None)
    report.validate_schema(json.loads(json.dumps(result)))
    rows = {row["method"]: row for row in result["results"]}
    assert list(rows) == ["lora", "dora", "pissa", "hira"]
    for method, row in rows.items():
        assert row["r"] == 8 and row["mora_type"] is None and row["step_s"] > 0 and row["peak_mem_bytes"] > 0
        assert row["model_flops_per_step"] == flops.model_flops_per_step(TINY, 2, 16, method, 8)
        assert row["mfu"] == pytest.approx(row["model_flops_per_step"] / row["step_s"] / result["peak_matmul_flops"])
    assert rows["pissa"]["model_flops_per_step"] == rows["lora"]["model_flops_per_step"]
    assert rows["hira"]["model_flops_per_step"] > rows["dora"]["model_flops_per_step"] > rows["lora"]["model_flops_per_step"]
    details = {d["label"]: d for d in result["details"]}
    assert details["dora r=8"]["trainable_params"] > details["lora r=8"]["trainable_params"]  # + the magnitudes
    assert details["pissa r=8"]["trainable_params"] == details["hira r=8"]["trainable_params"] == \
        details["lora r=8"]["trainable_params"]
    assert all(math.isfinite(d["loss"]) for d in result["details"])
    for method in ("dora", "pissa", "hira"):
        assert result["ratios"]["step"][f"{method}_r8/lora_r8"] == pytest.approx(
            rows[method]["step_s"] / rows["lora"]["step_s"])
    targets = result["targets"]
    assert targets["h: dora_r8 step / lora step"]["limit"] == 1.25
    assert targets["h: pissa_r8 step / lora step"]["limit"] == 1.05
    hira = targets["h: hira_r8 step / lora step"]
    floor = rows["hira"]["model_flops_per_step"] / rows["lora"]["model_flops_per_step"]
    assert hira["flop_floor"] == pytest.approx(floor) and hira["limit"] == pytest.approx(1.05 * floor)
    assert hira["value"] == pytest.approx(rows["hira"]["step_s"] / rows["lora"]["step_s"])
    text = report.report(result, markdown=True)
    assert "| hira | 8 |" in text and "FLOP floor" in text


@pytest.mark.torch
def test_peft_family_peer_rows():
    """--peer with benchmark.peft_methods: PEFT's DoRA (use_dora), PiSSA (pissa_niter_4) and HiRA
    (HiraConfig) beside PEFT's LoRA, in the rotation, each in the comparison with its own step over
    PEFT LoRA's (PEFT's DoRA / PEFT's LoRA)."""
    pytest.importorskip("peft")
    result = harness.run_benchmark(_peft_family_config(), with_peer=True, log=lambda _: None)
    peer_rows = {p["method"]: p for p in result["peer"]}
    assert list(peer_rows) == ["lora", "dora", "pissa", "hira"]
    assert all("peft" in p["framework"] and len(p["step_s_all"]) == 2 and math.isfinite(p["loss"])
               for p in peer_rows.values())
    for method, p in peer_rows.items():
        assert p["model_flops_per_step"] == flops.model_flops_per_step(TINY, 2, 16, method, 8)
    comparison = {c_["method"]: c_ for c_ in result["peer_comparison"]}
    assert comparison["dora"]["peer_step_over_peft_lora"] == pytest.approx(
        peer_rows["dora"]["step_s"] / peer_rows["lora"]["step_s"])
    assert comparison["lora"]["peer_step_over_peft_lora"] == 1.0
    assert {f"f: {m}_r8 tokens/s / PyTorch's" for m in peer_rows} <= set(result["targets"])
    assert "PyTorch step / PEFT LoRA step" in report.report(result)


@pytest.mark.slow  # about 50 s on two cores: 6 compiled steps
def test_quantized_base_comparison_reports_exact_bytes_and_one_rotation():
    from mora_jax.bench import quantized

    c = _quick_config()
    c.benchmark.mora_types = (6,)
    c.benchmark.quant_formats = ("none", "int8", "nf4")
    c.model.quantize.block_size = 4
    result = quantized.run_quantized(c, log=lambda _: None)
    rows = {r["format"]: r for r in result["rows"]}
    cfg = LLAMA_CONFIGS["tiny"]
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    kernels = [(cfg.hidden_size, d) for d in (cfg.hidden_size, kv, kv, cfg.hidden_size, cfg.intermediate_size,
                                                cfg.intermediate_size)] + [(cfg.intermediate_size, cfg.hidden_size)]
    kernels *= cfg.num_hidden_layers
    assert rows["none"]["target_bytes"]["bytes"] == sum(4 * k * d for k, d in kernels)  # float32
    assert rows["int8"]["target_bytes"]["bytes"] == sum(k * d + 4 * d for k, d in kernels)  # codes + a scale per column
    assert rows["nf4"]["target_bytes"]["bytes"] == sum(k * d // 2 + 4 * (k // 4) * d for k, d in kernels)
    assert rows["nf4"]["quantized_kernels"] == len(kernels) and rows["none"]["quantized_kernels"] == 0
    for row in result["rows"]:
        assert [s["label"] for s in row["steps"]] == ["lora r=8", "mora6 r=8"]
        assert all(s["step_s"] > 0 and s["peak_mem_bytes"] > 0 and math.isfinite(s["loss"]) for s in row["steps"])
    text = quantized.markdown(result)
    assert "| nf4 (blocks of 4) |" in text and "nf4: the quantized projections are 0.375x" in text
    with pytest.raises(ValueError, match="starts with 'none'"):
        BenchConfig.from_config({**c.to_dict(), "benchmark": {"quant_formats": ("int8",)}})
