"""Measure what a ReMoRA merge into a quantized base loses, for both merges ``model.quantize.merge``
offers: ``requantize`` (the merged kernel is quantized again, so part of the merged update ``ΔK`` is
rounded away and the rest of the kernel may be re-rounded) and ``residual`` (the update is kept
exactly beside the codes, :mod:`mora_jax.quant.residual`, at the cost of computing it in each step).
For each format and merge, the same small model, data and seed (ReMoRA, MoRA type cycle 1→2→3→4)
train; at every merge it records

* ``retained``: the share of ``ΔK`` the re-quantized kernel keeps, ``⟨K'−K, ΔK⟩ / ‖ΔK‖²`` (1 = all);
* ``error / ‖ΔK‖``: ``‖K' − (K + ΔK)‖ / ‖ΔK‖``, the merge's error relative to the update;
* ``error / ‖K‖``: the same relative to the kernel;
* ``Δ eval loss``: the held-out loss after the merge minus before it (float base: 0 up to rounding);

over all adapted kernels together (sums of squares), the final held-out loss and the median train
step time relative to the same format's ``requantize`` run (measured in this process, the runs one
after the other: a ratio, not a time). A second table
isolates the update's size: one re-quantization of a ``576 × 1536`` kernel (SmolLM2's MLP shape, weights
``N(0, 0.02²)``) merged with a random rank-8 update of relative size ``‖ΔK‖/‖K‖`` from 1e-4 to 1e-1.
A third (:func:`step_cost`) times what keeping merges costs per step at the 250M widths.

    python -m train.quant_merge                        # writes benchmarks/quant_merge.{json,md}
    python -m train.quant_merge --formats=none,int8,nf4 --merges=requantize,residual --steps=40 --every=10
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import jax
import numpy as np

from configs import c4_pretrain
from mora_jax import adapters as adapters_lib
from mora_jax import assembly, recipes
from mora_jax import data as data_lib
from mora_jax.experiments.provenance import provenance, provenance_markdown
from mora_jax.quant.formats import as_float, dequantize, quantize_kernel, requantize_like
from mora_jax.run_config import RunConfig

MODEL = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2}


def run_config(corpus: pathlib.Path, fmt: str, steps: int, every: int, lr: float, merge: str = "requantize") -> RunConfig:
    c = c4_pretrain.get_config("tiny")
    c.workdir = str(corpus / "unused")
    c.data.source, c.data.eval_source = str(corpus / "corpus.txt"), str(corpus / "corpus_eval.txt")
    c.data.tokenizer = str(corpus / "tok.model")
    c.train.steps, c.remora.every, c.optim.lr, c.optim.warmup_steps = steps, every, lr, 5
    c.train.progress = False
    c.model.overrides.update(MODEL)
    c.model.quantize.format = fmt
    c.model.quantize.merge = merge
    return RunConfig.from_dict(c)


def _host_kernels(frozen, paths):
    flat = adapters_lib.flatten(frozen)
    return {p: np.asarray(as_float(flat[p]), np.float64) for p in paths}


def measure(corpus: pathlib.Path, fmt: str, steps: int, every: int, lr: float, merge: str = "requantize") -> dict:
    config = run_config(corpus, fmt, steps, every, lr, merge)
    a = assembly.assemble(config)
    tokenizer = data_lib.Tokenizer(config.data.tokenizer)
    train_batches, eval_batches = recipes.build_data(config, "pretrain", tokenizer)
    held_out = [a.steps.shard_batch(b) for b in eval_batches()]
    state = a.steps.place(a.initial_state(a.load_params()))

    def eval_loss(state):
        sums = [a.steps.eval(state, b) for b in held_out]
        return float(sum(float(s["loss_sum"]) for s in sums) / sum(float(s["tokens"]) for s in sums))

    merges = []
    batches = iter(train_batches)
    times = []
    for step in range(1, steps + 1):
        batch = a.steps.shard_batch(next(batches))
        t0 = time.perf_counter()
        state, metrics = a.steps.train(state, batch)
        jax.block_until_ready(metrics)
        if step > 2 and not config.remora.is_merge_step(step - 1):  # the first steps and those after a merge compile
            times.append(time.perf_counter() - t0)
        if not config.remora.is_merge_step(step):
            continue
        paths = sorted(adapters_lib.flatten(state.adapters))
        before = _host_kernels(state.frozen, paths)
        deltas = {p: np.asarray(node.delta_weight(), np.float64).reshape(before[p].shape)
                  for p, node in adapters_lib.flatten(state.adapters).items()}
        loss_before = eval_loss(state)
        state = a.steps.merge(state, config.remora.type_at(step))
        after = _host_kernels(state.frozen, paths)
        dot = sum(float(np.sum((after[p] - before[p]) * deltas[p])) for p in paths)
        d2 = sum(float(np.sum(deltas[p] ** 2)) for p in paths)
        e2 = sum(float(np.sum((after[p] - before[p] - deltas[p]) ** 2)) for p in paths)
        k2 = sum(float(np.sum(before[p] ** 2)) for p in paths)
        merges.append({"step": step, "retained": dot / d2, "error_over_delta": (e2 / d2) ** 0.5,
                       "error_over_kernel": (e2 / k2) ** 0.5, "delta_over_kernel": (d2 / k2) ** 0.5,
                       "eval_loss_change": eval_loss(state) - loss_before})
    steady = sorted(times) or [float("nan")]
    return {"format": fmt, "merge": merge if fmt != "none" else "exact", "merges": merges,
            "final_eval_loss": eval_loss(state), "median_step_s": steady[len(steady) // 2]}


def _label(r) -> str:
    return r["format"] if r["format"] == "none" else f"{r['format']}, {r['merge']}"


def _relative_time(r, results) -> str:
    ref = [x for x in results if x["format"] == r["format"] and x["merge"] == "requantize"]
    return f"{r['median_step_s'] / ref[0]['median_step_s']:.2f}" if ref else "—"


COST_MODEL = {"num_hidden_layers": 4}  # the 250M preset's widths (hidden 768, MLP 2560), 4 layers scanned


def step_cost(method: str, r: int, merges: int, steps: int) -> dict:
    """What keeping merges costs per train step at the 250M widths on an NF4 base: the same step with
    room for ``merges`` kept merges (LoRA: rank ``r·merges`` beside each kernel; MoRA: one ``m`` per type
    of the cycle 1→2→3→4) and without (``requantize``), timed alternately in this process; the median
    ratio. The slots' values do not change the work, so no merge is run."""
    assembled = {}
    for merge in ("requantize", "residual"):
        config = RunConfig.from_dict({
            "method": method, "workdir": "/unused",
            "model": {"preset": "mora-250m", "overrides": COST_MODEL, "scan_layers": True,
                      "quantize": {"format": "nf4", "merge": merge}},
            "adapter": {"r": r, "mora_type": 1} if method == "mora" else {"r": r},
            "remora": {"every": 10}, "optim": {"warmup_steps": 0},
            "train": {"steps": 10 * merges + 1, "batch_size": 1, "seq_len": 256}})
        a = assembly.assemble(config)
        state = a.steps.place(a.initial_state(a.load_params()))
        batch = a.steps.shard_batch({"input_ids": np.arange(256, dtype=np.int32)[None] % 1000})
        state, metrics = a.steps.train(state, batch)  # compiles
        jax.block_until_ready(metrics)
        assembled[merge] = [a, state, batch]
    times = {"requantize": [], "residual": []}
    for _ in range(steps):
        for merge, entry in assembled.items():
            a, state, batch = entry
            t0 = time.perf_counter()
            entry[1], metrics = a.steps.train(state, batch)
            jax.block_until_ready(metrics)
            times[merge].append(time.perf_counter() - t0)
    ratios = sorted(k / q for k, q in zip(times["residual"], times["requantize"]))
    return {"method": method, "r": r, "merges": merges, "ratio_median": ratios[len(ratios) // 2],
            "ratio_min": ratios[0], "ratio_max": ratios[-1],
            "requantize_median_s": sorted(times["requantize"])[steps // 2]}


SIZES = (1e-4, 1e-3, 1e-2, 1e-1)


def update_sizes(formats: list[str]) -> list[dict]:
    """One merge of a random rank-8 update of each relative size into a quantized ``576 × 1536`` kernel."""
    key_k, key_a, key_b = jax.random.split(jax.random.key(0), 3)
    kernel = 0.02 * jax.random.normal(key_k, (576, 1536))
    direction = jax.random.normal(key_a, (576, 8)) @ jax.random.normal(key_b, (8, 1536))
    rows = []
    for fmt in formats:
        if fmt == "none":
            continue
        leaf = quantize_kernel(kernel, fmt)
        base = np.asarray(dequantize(leaf), np.float64)
        for size in SIZES:
            delta = np.asarray(direction, np.float64) * size * np.linalg.norm(base) / np.linalg.norm(direction)
            merged = np.asarray(dequantize(requantize_like(leaf, jax.numpy.asarray(base + delta))), np.float64)
            err = merged - base - delta
            rows.append({"format": fmt, "size": size,
                         "retained": float(np.sum((merged - base) * delta) / np.sum(delta ** 2)),
                         "error_over_delta": float(np.linalg.norm(err) / np.linalg.norm(delta)),
                         "error_over_kernel": float(np.linalg.norm(err) / np.linalg.norm(base))})
    return rows


def markdown(results: list[dict], sizes: list[dict], record: dict, args, costs: list[dict] = ()) -> str:
    lines = [f"# ReMoRA merges into a quantized base ({args.steps} steps, merge every {args.every}, lr {args.lr})", "",
             "`python -m train.quant_merge` (docs/quantization.md). Per merge: the share of the merged update the "
             "kept kernel holds (re-quantized, or with the update kept beside the codes), the merge's error relative "
             "to the update and to the kernel, the update's size, and the held-out loss after minus before the merge. "
             "Model: the tiny preset widened to "
             f"{MODEL}; synthetic corpus; MoRA r=8, types 1→2→3→4.", "",
             "| base | merge at step | retained | ‖err‖/‖ΔK‖ | ‖err‖/‖K‖ | ‖ΔK‖/‖K‖ | Δ eval loss |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for m in r["merges"]:
            lines.append(f"| {_label(r)} | {m['step']} | {m['retained']:.3f} | {m['error_over_delta']:.3f} | "
                         f"{m['error_over_kernel']:.2e} | {m['delta_over_kernel']:.2e} | {m['eval_loss_change']:+.4f} |")
    lines += ["", "| base | final held-out loss | train step time / the format's requantize run |", "|---|---|---|"]
    lines += [f"| {_label(r)} | {r['final_eval_loss']:.4f} | {_relative_time(r, results)} |" for r in results]
    lines += ["", "One merge by the update's size (576 × 1536 kernel, N(0, 0.02²) weights, random rank-8 update):", "",
              "| base | ‖ΔK‖/‖K‖ | retained | ‖err‖/‖ΔK‖ | ‖err‖/‖K‖ |", "|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['size']:.0e} | {r['retained']:.3f} | {r['error_over_delta']:.3f} | "
              f"{r['error_over_kernel']:.2e} |" for r in sizes]
    if costs:
        lines += ["", "The cost of keeping merges: the 250M widths (hidden 768, MLP 2560), 4 layers scanned, batch 1 × 256, "
                  "float32, an NF4 base; train step time with room for the kept merges over the same step without "
                  "(alternating, median and range over the timed pairs):", "",
                  "| method | kept beside each kernel | step time, residual / requantize |", "|---|---|---|"]
        for c in costs:
            kept = (f"MoRA: 4 frozen m (types 1-4), r = {c['r']}" if c["method"] == "mora"
                    else f"LoRA: rank {c['r']} × {c['merges']} merges")
            lines.append(f"| {c['method']} r={c['r']} | {kept} | {c['ratio_median']:.3f} "
                         f"({c['ratio_min']:.3f}–{c['ratio_max']:.3f}) |")
    return "\n".join(lines + ["", provenance_markdown(record), ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.quant_merge", description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="none,int8,int4,nf4,q4_1")
    parser.add_argument("--merges", default="requantize,residual", help="model.quantize.merge values to measure")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--cost-steps", type=int, default=6, help="timed step pairs of the cost table (0: skip it)")
    parser.add_argument("--out", default="benchmarks/quant_merge")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = pathlib.Path(tmp)
        data_lib.write_synthetic_corpus(corpus / "corpus.txt", 1500, seed=0)
        data_lib.write_synthetic_corpus(corpus / "corpus_eval.txt", 100, seed=1)
        data_lib.train_tokenizer(str(corpus / "corpus.txt"), str(corpus / "tok"), vocab_size=512)
        results = []
        for fmt in args.formats.split(","):
            for merge in args.merges.split(",") if fmt != "none" else ["requantize"]:
                results.append(measure(corpus, fmt, args.steps, args.every, args.lr, merge))
                print(json.dumps(results[-1]), flush=True)
    sizes = update_sizes(args.formats.split(","))
    costs = []
    if args.cost_steps:
        for method, r in (("mora", 8), ("mora", 128), ("lora", 8), ("lora", 128)):
            costs.append(step_cost(method, r, merges=4, steps=args.cost_steps))
            print(json.dumps(costs[-1]), flush=True)
    record = provenance(seeds=[0])
    out = pathlib.Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"results": results, "update_sizes": sizes, "step_costs": costs,
                                                    "provenance": record, "args": vars(args)}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results, sizes, record, args, costs))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
