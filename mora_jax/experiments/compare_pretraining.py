"""The paper's pretraining comparison: full training, LoRA, ReLoRA, MoRA and ReMoRA (and DoRA, PiSSA,
HiRA at LoRA's rank) from scratch on the same tokens, evaluated at the same token counts.

Every method trains the same model from the same initialisation (per seed) on the same token
stream, in the reference's style: embeddings, LM head and norms trained in full (``adapter.unfreeze``),
LoRA and MoRA with equal trainable parameters at the config's ``adapter.r`` (MoRA's r̂ is chosen to
match), ReLoRA and ReMoRA merging every ``remora.every`` steps with an optimizer reset and a
learning-rate re-warm-up (ReMoRA cycling MoRA's operator types). "full" trains every parameter.

Each (method, seed) is an ordinary run of :func:`mora_jax.recipes.run` in its own workdir
(``<workdir>/<method>/seed<k>``), so an interrupted comparison resumes where it stopped; a finished
run is recognised by its ``done.json`` and not run again. The comparison writes ``results.md``,
``results.json`` (with provenance: seeds, machine, versions, commit), ``perplexity.png`` (eval
perplexity against tokens, mean and min–max over seeds) and ``remora_diagnostics.png`` (the merge
diagnostics of the merging methods next to their loss).
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from mora_jax import adapters as adapters_lib
from mora_jax import recipes
from mora_jax.experiments.provenance import provenance, provenance_markdown
from mora_jax.experiments.runs import cached_run, mean_std
from mora_jax.methods import LLAMA_FULLY_TRAINED, LLAMA_TARGETS
from mora_jax.run_config import RunConfig

METHODS = ("full", "lora", "relora", "mora", "remora", "dora", "pissa", "hira", "mora_mag", "remora_mag")
LABELS = {"full": "full training", "lora": "LoRA", "relora": "ReLoRA", "mora": "MoRA", "remora": "ReMoRA",
          "dora": "DoRA", "pissa": "PiSSA", "hira": "HiRA", "mora_mag": "MoRA + magnitude",
          "remora_mag": "ReMoRA + magnitude"}
# the mora_jax.methods name each compared method trains with (the "re" ones merge every remora.every steps;
# the "_mag" ones with a DoRA-style magnitude, MoRAConfig(magnitude=True))
ADAPTER_METHOD = {"full": "full", "lora": "lora", "relora": "lora", "mora": "mora", "remora": "mora",
                  "dora": "dora", "pissa": "pissa", "hira": "hira", "mora_mag": "mora", "remora_mag": "mora"}


def method_config(config, method: str, seed: int, workdir: pathlib.Path) -> RunConfig:
    """The run config of one (method, seed) from the comparison's base config (an ml_collections
    dict with the ``configs/base.py`` sections)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {','.join(METHODS)}")
    c = config.to_dict() if hasattr(config, "to_dict") else json.loads(json.dumps(config))
    c["seed"] = seed
    c["workdir"] = str(workdir)
    merges = c["remora"]["every"]
    if method in ("relora", "remora", "remora_mag") and not merges:
        raise ValueError(f"{method} merges every remora.every steps, but remora.every is 0: set it, "
                         "e.g. --config.remora.every=150")
    c["method"] = ADAPTER_METHOD[method]
    c["remora"]["every"] = merges if method in ("relora", "remora", "remora_mag") else 0
    if method.endswith("_mag"):
        c["adapter"]["magnitude"] = True
    if method == "full":
        c["adapter"]["targets"] = LLAMA_TARGETS
        c["adapter"]["unfreeze"] = ",".join(LLAMA_FULLY_TRAINED)
    c["export"] = {"adapter": False, "merged": False}
    return RunConfig.from_dict(c)


def _eval_curve(history: list[dict], tokens_per_step: int) -> list[tuple[int, float, float]]:
    return [(r["step"] * tokens_per_step, r["eval_loss"], r["eval_perplexity"]) for r in history if "eval_loss" in r]


def run_one(config, method: str, seed: int, workdir: pathlib.Path) -> dict:
    """Train one (method, seed), or read its record if it finished before."""

    def train() -> dict:
        run_config = method_config(config, method, seed, workdir)
        t0 = time.perf_counter()
        result = recipes.run(run_config, "pretrain")
        if result.preempted:
            raise SystemExit(f"{method} seed {seed} was preempted; run the same command again to resume")
        t = run_config.train
        tokens_per_step = t.batch_size * t.seq_len
        return {
            "method": method, "seed": seed,
            "trainable_params": adapters_lib.count_params(result.state.trainables),
            "adapter_params": adapters_lib.count_params(result.state.trainables["adapters"]),
            "wall_s": time.perf_counter() - t0, "tokens_per_step": tokens_per_step,
            "eval": _eval_curve(result.history, tokens_per_step),
            "train_loss": [(r["step"], r["loss"]) for r in result.history if "loss" in r],
            "merges": [r for r in result.history if r.get("remora_merge")],
        }

    return cached_run(workdir, train)


def compare(config, methods=METHODS, seeds=(0,)) -> dict:
    """Run every method for every seed and write the comparison's artifacts into ``config.workdir``."""
    workdir = pathlib.Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # seed by seed, so the first seeds' results are complete while later ones still train
    runs = [run_one(config, m, s, workdir / m / f"seed{s}") for s in seeds for m in methods]
    results = {"methods": list(methods), "seeds": list(seeds), "runs": runs, "config": config.to_dict(),
               "provenance": provenance(seeds)}
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (workdir / "results.md").write_text(results_markdown(results))
    plot_perplexity(results, workdir / "perplexity.png")
    plot_diagnostics(results, workdir / "remora_diagnostics.png")
    return results


def _by_method(results):
    out: dict[str, list[dict]] = {}
    for run in results["runs"]:
        out.setdefault(run["method"], []).append(run)
    return out


def results_markdown(results) -> str:
    """Eval perplexity at each evaluated token count (mean ± sample std over seeds), final eval loss,
    trainable parameters and wall time per method."""
    by_method = _by_method(results)
    first = by_method[results["methods"][0]][0]
    tokens = [e[0] for e in first["eval"]]
    head = "| method | trainable params | " + " | ".join(f"ppl @ {t / 1e6:.2f}M tok" for t in tokens)
    lines = [head + " | final eval loss | wall time (s) |", "|---|---:|" + "---:|" * len(tokens) + "---:|---:|"]
    for method in results["methods"]:
        runs = by_method[method]
        ppl = [mean_std([r["eval"][i][2] for r in runs]) for i in range(len(tokens))]
        lines.append(f"| {LABELS[method]} | {runs[0]['trainable_params']:,} | " + " | ".join(ppl)
                     + f" | {mean_std([r['eval'][-1][1] for r in runs])} | {mean_std([r['wall_s'] for r in runs])} |")
    return ("\n".join(lines) + "\n\n" + provenance_markdown(results["provenance"]) + "\n")


def plot_perplexity(results, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, runs in _by_method(results).items():
        tokens = np.array([e[0] for e in runs[0]["eval"]]) / 1e6
        ppl = np.array([[e[2] for e in r["eval"]] for r in runs])
        ax.plot(tokens, ppl.mean(0), "o-", ms=3, label=f"{LABELS[method]} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        if len(runs) > 1:
            ax.fill_between(tokens, ppl.min(0), ppl.max(0), alpha=0.2)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("eval perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("Pretraining from scratch: mean and min–max over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_diagnostics(results, path: pathlib.Path) -> None:
    """Train loss, merged ‖ΔW‖ and the effective rank of the accumulated change for the merging methods."""
    merging = [m for m in results["methods"] if m in ("relora", "remora")]
    if not merging:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method in merging:
        run = _by_method(results)[method][0]
        axes[0].plot(*zip(*run["train_loss"]), lw=1, label=LABELS[method])
        steps = [m["step"] for m in run["merges"]]
        for key in sorted(k for k in run["merges"][0] if k.startswith("merge_delta_norm/"))[:2] if run["merges"] else []:
            axes[1].plot(steps, [m[key] for m in run["merges"]], "o-", ms=3, label=f"{LABELS[method]} {key.split('/')[-1]}")
        for key in sorted(k for k in run["merges"][0] if k.startswith("accumulated_effective_rank/")) if run["merges"] else []:
            short = "/".join(key.split("/")[-4:-1])
            axes[2].plot(steps, [m[key] for m in run["merges"]], "o-", ms=3, label=f"{LABELS[method]} {short}")
    for ax, title in zip(axes, ("train loss", "‖ΔW‖ merged", "effective rank of W − W₀")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["METHODS", "compare", "method_config", "results_markdown", "run_one"]
