"""Reports of the benchmark: the JSON schema, text and markdown tables, and the scaling plot.

:func:`report` renders a :func:`mora_jax.bench.harness.run_benchmark` result (methods table, merge,
``delta_weight``, XLA tuning ablation, targets, the PyTorch peer), :func:`scaling_markdown` and
:func:`plot_scaling` a :func:`mora_jax.bench.harness.run_scaling` result. :func:`validate_schema`
checks the keys of the documented JSON schema (``train/benchmark.py``). matplotlib is imported
only by :func:`plot_scaling`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping

from mora_jax.bench.methods import MethodSpec, row_spec
from mora_jax.methods import METHODS

# The JSON schema (top level, "model", each "results" row, "merge"); other top-level keys are extras.
SCHEMA_TOP = ("device", "dtype", "peak_matmul_flops", "model", "results", "merge")
SCHEMA_MODEL = ("name", "params", "batch", "seq_len")
SCHEMA_ROW = ("method", "r", "mora_type", "step_s", "tokens_per_s", "model_flops_per_step", "mfu", "peak_mem_bytes")
SCHEMA_MERGE = ("step_s", "merge_s")


def _fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def results_table(result: Mapping, markdown: bool = False) -> str:
    """The results as a table (plain text, or markdown)."""
    header = ["method", "r", "type", "step s", "tokens/s", "GFLOP/step", "MFU", "peak mem", "vs LoRA", "vs full"]
    ratio = result.get("ratios", {}).get("step", {})
    lines = []
    for row in result["results"]:
        tag = row_spec(row).tag
        vs_lora = ratio.get(f"{tag}/lora_r{row['r']}")
        vs_full = ratio.get(f"{tag}/full")
        lines.append([row["method"], "-" if row["r"] is None else str(row["r"]),
                      "-" if row["mora_type"] is None else str(row["mora_type"]),
                      f"{row['step_s']:.4f}", f"{row['tokens_per_s']:,.0f}", f"{row['model_flops_per_step'] / 1e9:.2f}",
                      f"{100 * row['mfu']:.1f}%", _fmt_bytes(row["peak_mem_bytes"]),
                      "-" if vs_lora is None else f"{vs_lora:.2f}x", "-" if vs_full is None else f"{vs_full:.2f}x"])
    return _table(header, lines, markdown)


def _table(header, lines, markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda row: "  ".join(str(x).rjust(w) for x, w in zip(row, widths))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def report(result: Mapping, markdown: bool = False) -> str:
    """Header, results table, merge, delta_weight and targets as text (or markdown)."""
    m = result["model"]
    parts = [f"{'**' if markdown else ''}{m['name']}{'**' if markdown else ''}: {m['params']:,} parameters, "
             f"batch {m['batch']} x seq {m['seq_len']}, {result['dtype']}, on {result['device']}; "
             f"measured matmul peak {result['peak_matmul_flops'] / 1e9:.1f} GFLOP/s",
             "", results_table(result, markdown), ""]
    md = result.get("merge_details", {})
    parts.append(f"ReMoRA merge of the whole model (mora{md.get('mora_type')} r={md.get('r')}, "
                 f"{md.get('kernels')} kernels): {result['merge']['merge_s']:.4f} s = "
                 f"{result['merge']['merge_s'] / result['merge']['step_s']:.2f}x its training step "
                 f"({result['merge']['step_s']:.4f} s)")
    if "delta_weight" in result:
        dw = result["delta_weight"]
        parts += ["", f"delta_weight {dw['in_features']}x{dw['out_features']} r={dw['r']} (float32, "
                  f"{dw['bytes'] / 2**20:.0f} MiB): write-only fill {dw['fill_s'] * 1e3:.1f} ms, "
                  f"read+write copy {dw['copy_s'] * 1e3:.1f} ms", ""]
        header = ["type", "r_hat", "delta_weight ms", "/ fill", "/ copy", "K+dK (donated) ms", "/ copy"]
        lines = [[str(row["mora_type"]), str(row["r_hat"]), f"{row['delta_weight_s'] * 1e3:.1f}",
                  f"{row['ratio_to_fill']:.2f}x", f"{row['ratio_to_copy']:.2f}x", f"{row['merge_s'] * 1e3:.1f}",
                  f"{row['merge_ratio_to_copy']:.2f}x"] for row in dw["types"]]
        parts.append(_table(header, lines, markdown))
    tuning = result.get("xla_tuning") or {}
    if tuning.get("ablation"):
        parts += ["", f"XLA tuning ({tuning['compiler_options']}), same steps compiled without it:", ""]
        header = ["method", "step s tuned", "step s untuned", "tuned / untuned"]
        lines = [[row["label"], f"{row['step_s_tuned']:.4f}", f"{row['step_s_untuned']:.4f}",
                  f"{row['tuned_over_untuned']:.2f}x"] for row in tuning["ablation"]]
        parts.append(_table(header, lines, markdown))
    if result.get("targets"):
        parts += ["", "targets:" if not markdown else "Targets:", ""]
        header = ["target", "value", "limit", "met"]
        lines = [[name, "n/a" if t["value"] is None else f"{t['value']:.3f}",
                  f"{t['limit']:.3f} (1.05 x FLOP floor {t['flop_floor']:.3f})" if "flop_floor" in t else f"{t['limit']}",
                  {True: "yes", False: "NO", None: "n/a"}[t["met"]]] for name, t in result["targets"].items()]
        parts.append(_table(header, lines, markdown))
    if result.get("peer"):
        parts += ["", "PyTorch peer (HF transformers + PEFT, same CPU):", ""]
        header = ["framework", "method", "r", "type", "step s", "tokens/s", "MFU", "MFU vs torch matmul peak"]
        lines = [[p["framework"], p["method"], "-" if p["r"] is None else str(p["r"]),
                  "-" if p.get("mora_type") is None else str(p["mora_type"]), f"{p['step_s']:.4f}",
                  f"{p['tokens_per_s']:,.0f}", f"{100 * p['mfu']:.1f}%",
                  f"{100 * p.get('mfu_vs_torch_peak', float('nan')):.1f}% of {p.get('torch_peak_matmul_flops', 0) / 1e9:.0f} GFLOP/s"]
                 for p in result["peer"]]
        parts.append(_table(header, lines, markdown))
    if result.get("peer_comparison"):
        comparison = result["peer_comparison"]
        peaks = (f"measured matmul peaks: mora-jax (XLA) {comparison[0]['peak_matmul_flops'] / 1e9:.1f} GFLOP/s, "
                 f"PyTorch {(comparison[0]['peer_peak_matmul_flops'] or 0) / 1e9:.1f} GFLOP/s"
                 if comparison[0].get("peer_peak_matmul_flops") else "")
        parts += ["", f"mora-jax vs PyTorch, same method, same rotation ({peaks}):", ""]
        header = ["method", "r", "type", "mora-jax tok/s", "PyTorch tok/s", "speed-up", "peak ratio",
                  "step / PEFT LoRA step", "PyTorch step / PEFT LoRA step"]
        lines = [[c["method"], "-" if c["r"] is None else str(c["r"]), "-" if c["mora_type"] is None else str(c["mora_type"]),
                  f"{c['tokens_per_s']:,.0f}", f"{c['peer_tokens_per_s']:,.0f}", f"{c['speedup']:.2f}x",
                  "-" if c.get("peak_ratio") is None else f"{c['peak_ratio']:.2f}x",
                  "-" if c.get("step_over_peft_lora") is None else f"{c['step_over_peft_lora']:.2f}x",
                  "-" if c.get("peer_step_over_peft_lora") is None else f"{c['peer_step_over_peft_lora']:.2f}x"]
                 for c in comparison]
        parts.append(_table(header, lines, markdown))
    if result.get("peer_generation"):
        gen = result["peer_generation"]
        g = gen["settings"]
        parts += ["", f"Generation, greedy, base model, prompt {g['prompt_len']} + {g['new_tokens']} new tokens "
                  f"(median of {g['repeats']} interleaved calls):", ""]
        header = ["framework", "batch", "prefill tok/s", "decode tok/s", "generate new tok/s"]
        lines = [[row["framework"], str(row["batch"]), f"{row['prefill_tokens_per_s']:,.0f}",
                  "n/a" if row["decode_tokens_per_s"] is None else f"{row['decode_tokens_per_s']:,.1f}",
                  f"{row['generate_new_tokens_per_s']:,.1f}"] for row in gen["rows"]]
        parts.append(_table(header, lines, markdown))
    return "\n".join(parts)


def validate_schema(result: Mapping) -> None:
    """Raise ``ValueError`` unless ``result`` has the benchmark JSON schema's keys and types."""
    missing = [k for k in SCHEMA_TOP if k not in result]
    if missing:
        raise ValueError(f"missing top-level keys {missing}")
    if set(result["model"]) != set(SCHEMA_MODEL):
        raise ValueError(f"model keys {sorted(result['model'])} != {sorted(SCHEMA_MODEL)}")
    if set(result["merge"]) != set(SCHEMA_MERGE):
        raise ValueError(f"merge keys {sorted(result['merge'])} != {sorted(SCHEMA_MERGE)}")
    for row in result["results"]:
        if set(row) != set(SCHEMA_ROW):
            raise ValueError(f"result row keys {sorted(row)} != {sorted(SCHEMA_ROW)}")
        if row["method"] not in METHODS:
            raise ValueError(f"unknown method {row['method']!r}")


def write_json(result: Mapping, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return path

def _label(row) -> str:
    return MethodSpec(row["method"], row["r"], row["mora_type"]).label


def scaling_markdown(scaling: Mapping) -> str:
    m = scaling["model"]
    out = [f"Scaling study: **{m['name']}** ({m['params']:,} parameters), {scaling['dtype']}, on {scaling['device']}; "
           f"matmul peak {scaling['peak_matmul_flops'] / 1e9:.1f} GFLOP/s; median of {scaling['settings']['steps']} steps.", ""]
    for key, title in (("vs_seq_len", "Step time (s) vs sequence length (batch %d)" % m["batch"]),
                       ("vs_batch", "Step time (s) vs batch (seq_len %d)" % m["seq_len"])):
        rows = scaling[key]
        labels = list(dict.fromkeys(_label(r) for r in rows))
        xs = list(dict.fromkeys((r["batch"], r["seq_len"]) for r in rows))
        header = ["batch x seq (tokens)"] + labels + [f"{lbl} MFU" for lbl in labels]
        lines = []
        for b, t in xs:
            cell = {_label(r): r for r in rows if (r["batch"], r["seq_len"]) == (b, t)}
            lines.append([f"{b} x {t} ({b * t})"] + [f"{cell[l]['step_s']:.4f}" for l in labels]
                         + [f"{100 * cell[l]['mfu']:.1f}%" for l in labels])
        out += [f"**{title}**", "", _table(header, lines, True), ""]
    rows = scaling["vs_rank"]
    full = next(r for r in rows if r["method"] == "full")
    ranks = sorted({r["r"] for r in rows if r["r"]})
    # every method other than full fine-tuning and LoRA: MoRA by type, then the PEFT family
    others = list(dict.fromkeys((r["method"], r["mora_type"]) for r in rows if r["method"] not in ("full", "lora")))
    names = [f"{m}{t or ''}" for m, t in others]
    header = ["r", "lora s"] + [f"{n} s" for n in names] + [f"{n}/lora" for n in names] + [f"{n}/full" for n in names]
    lines = []
    for r in ranks:
        lora = next(x for x in rows if x["method"] == "lora" and x["r"] == r)
        at = {(x["method"], x["mora_type"]): x for x in rows if x["r"] == r}
        cells = [at[o]["step_s"] for o in others]
        lines.append([str(r), f"{lora['step_s']:.4f}"] + [f"{c:.4f}" for c in cells]
                     + [f"{c / lora['step_s']:.2f}" for c in cells] + [f"{c / full['step_s']:.2f}" for c in cells])
    out += [f"**Step time vs rank** (full fine-tuning: {full['step_s']:.4f} s)", "", _table(header, lines, True), ""]
    header = ["k x d", "MiB", "fill ms", "copy ms"] + [
        f"type {t['mora_type']} {h}" for t in scaling["vs_kernel_size"][0]["types"] for h in ("ms", "/ fill")]
    lines = []
    for row in scaling["vs_kernel_size"]:
        lines.append([f"{row['in_features']}x{row['out_features']}", f"{row['bytes'] / 2**20:.1f}",
                      f"{row['fill_s'] * 1e3:.2f}", f"{row['copy_s'] * 1e3:.2f}"]
                     + [v for t in row["types"] for v in (f"{t['delta_weight_s'] * 1e3:.2f}", f"{t['ratio_to_fill']:.2f}x")])
    out += ["**delta_weight (merge) time vs kernel size** (r=%d)" % scaling["vs_kernel_size"][0]["r"], "",
            _table(header, lines, True), ""]
    return "\n".join(out)


def plot_scaling(scaling: Mapping, path) -> pathlib.Path:
    """Three panels: step time vs tokens, vs rank, and delta_weight time vs kernel size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    rows = scaling["vs_seq_len"] + scaling["vs_batch"]
    for label in dict.fromkeys(_label(r) for r in rows):
        for key, style in (("vs_seq_len", "-o"), ("vs_batch", "--s")):
            pts = sorted((r["tokens"], r["step_s"]) for r in scaling[key] if _label(r) == label)
            ax.plot(*zip(*pts), style, label=f"{label} ({'seq' if key == 'vs_seq_len' else 'batch'})")
    ax.set(xscale="log", yscale="log", xlabel="tokens per step", ylabel="step time (s)", title="Step time vs tokens")
    ax.legend(fontsize=7)
    ax = axes[1]
    rows = scaling["vs_rank"]
    full = next(r for r in rows if r["method"] == "full")
    for label_of in sorted({(r["method"], r["mora_type"]) for r in rows if r["method"] != "full"}, key=str):
        pts = sorted((r["r"], r["step_s"]) for r in rows if (r["method"], r["mora_type"]) == label_of)
        ax.plot(*zip(*pts), "-o", label=label_of[0] + (str(label_of[1]) if label_of[1] else ""))
    ax.axhline(full["step_s"], color="k", ls=":", label="full")
    ax.set(xscale="log", xlabel="r", ylabel="step time (s)", title="Step time vs rank")
    ax.legend(fontsize=8)
    ax = axes[2]
    rows = scaling["vs_kernel_size"]
    elems = [r["in_features"] * r["out_features"] for r in rows]
    ax.plot(elems, [r["fill_s"] for r in rows], "k:o", label="write output (fill)")
    ax.plot(elems, [r["copy_s"] for r in rows], "k--o", label="copy (read+write)")
    for i, t in enumerate(rows[0]["types"]):
        ax.plot(elems, [r["types"][i]["delta_weight_s"] for r in rows], "-o", label=f"delta_weight type {t['mora_type']}")
    ax.set(xscale="log", yscale="log", xlabel="kernel elements k*d", ylabel="time (s)", title="delta_weight vs kernel size")
    ax.legend(fontsize=8)
    fig.suptitle(f"{scaling['model']['name']} on {scaling['device']} ({scaling['dtype']})", fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["SCHEMA_MERGE", "SCHEMA_MODEL", "SCHEMA_ROW", "SCHEMA_TOP", "plot_scaling", "report", "results_table",
           "scaling_markdown", "validate_schema", "write_json"]
