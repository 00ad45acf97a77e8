"""The paper's pretraining comparison: full training, LoRA, ReLoRA, MoRA and ReMoRA (and DoRA, PiSSA,
HiRA at LoRA's rank) from scratch on the same tokens, evaluated at the same token counts, each
method at its own tuned learning rate.

Every method trains the same model from the same initialisation (per seed) on the same token
stream, in the reference's style: embeddings, LM head and norms trained in full (``adapter.unfreeze``),
LoRA and MoRA with equal trainable parameters at the config's ``adapter.r`` (MoRA's r̂ is chosen to
match), ReLoRA and ReMoRA merging every ``remora.every`` steps with an optimizer reset and a
learning-rate re-warm-up (ReMoRA cycling MoRA's operator types). "full" trains every parameter.

The rate is tuned per method as in the fine-tuning comparison: every rate of the method's grid
(``experiment.lrs[method]``, at least four, log-spaced) trains ``experiment.sweep_steps`` steps at
the first seed; the rate with the lowest eval loss at the end is chosen (a diverged rate loses) and
every seed trains ``train.steps`` at it (a sweep as long as the run is the first seed's run). The peak rate lives in the optimizer state
(``optim.lr_in_state``), so the compiled step of a method's first sweep run, kept in
``<workdir>/compilation_cache``, serves its other rates and seeds.

Each (method, seed) is an ordinary run of :func:`mora_jax.recipes.run` in its own workdir
(``<workdir>/<method>/seed<k>``, a sweep's in ``<workdir>/sweep/<method>/lr<lr>``), so an interrupted comparison resumes where it stopped; a finished
run is recognised by its ``done.json`` and not run again. The comparison writes ``results.md``,
``results.json`` (with provenance: seeds, machine, versions, commit), ``perplexity.png`` (eval
perplexity against tokens, mean and min–max over seeds), ``sweep.png`` (each method's eval loss
against the rate) and ``remora_diagnostics.png`` (the merge
diagnostics of the merging methods next to their loss).
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from mora_jax import adapters as adapters_lib
from mora_jax import loop, recipes
from mora_jax.experiments import runs as runs_lib
from mora_jax.experiments.compare_finetuning import MIN_SWEEP_LRS
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


def method_config(config, method: str, seed: int, workdir: pathlib.Path, *, lr: float | None = None,
                  steps: int | None = None) -> RunConfig:
    """The run config of one (method, seed) from the comparison's base config (an ml_collections
    dict with the ``configs/base.py`` sections, plus ``experiment``): at peak learning rate ``lr``
    (default ``optim.lr``) kept in the optimizer state, for ``steps`` steps (default ``train.steps``;
    a shorter sweep run evaluates once, at its end)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {','.join(METHODS)}")
    c = config.to_dict() if hasattr(config, "to_dict") else json.loads(json.dumps(config))
    c.pop("experiment", None)
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
    c["optim"].update(lr=float(c["optim"]["lr"] if lr is None else lr), lr_in_state=True)
    if steps is not None and steps != c["train"]["steps"]:
        c["train"].update(steps=int(steps), eval_every=int(steps))
        c["optim"]["warmup_steps"] = min(int(c["optim"]["warmup_steps"]), int(steps))
    c["export"] = {"adapter": False, "merged": False}
    return RunConfig.from_dict(c)


def check_sweep(config, methods) -> None:
    """One clear line for a comparison whose sweep cannot run as configured."""
    e = config.get("experiment") if hasattr(config, "get") else None
    if e is None or "lrs" not in e or "sweep_steps" not in e:
        raise ValueError("the config has no experiment.lrs / experiment.sweep_steps (each method's learning-rate "
                         "grid and the sweep's budget): use --config=configs/compare_pretraining.py:cpu, or add them")
    for method in methods:
        lrs = [float(x) for x in e.lrs.get(method, ())]
        if len(set(lrs)) < MIN_SWEEP_LRS or min(lrs) <= 0:
            raise ValueError(f"experiment.lrs.{method} has {len(set(lrs))} distinct rates; the sweep needs at least "
                             f"{MIN_SWEEP_LRS} positive ones, e.g. --config.experiment.lrs.{method}='(1e-3, 3e-3, 1e-2, 3e-2)'")
    steps, total, merges = int(e.sweep_steps), int(config.train.steps), int(config.remora.every)
    if not 1 <= steps <= total:
        raise ValueError(f"experiment.sweep_steps={steps} must lie in [1, train.steps={total}]")
    merging = [m for m in methods if m in ("relora", "remora", "remora_mag")]
    if merging and merges and steps <= merges:
        raise ValueError(f"experiment.sweep_steps={steps} is not longer than remora.every={merges}: {','.join(merging)} "
                         "would be tuned without a merge (none comes at a run's last step); set experiment.sweep_steps "
                         "> remora.every")


def _eval_curve(history: list[dict], tokens_per_step: int) -> list[tuple[int, float, float]]:
    return [(r["step"] * tokens_per_step, r["eval_loss"], r["eval_perplexity"]) for r in history if "eval_loss" in r]


def run_one(config, method: str, seed: int, workdir: pathlib.Path, *, lr: float | None = None,
            steps: int | None = None) -> dict:
    """Train one (method, seed) at ``lr`` for ``steps`` (see :func:`method_config`), or read its record
    if it finished before with the same settings. A run that diverges is recorded as such."""
    run_config = method_config(config, method, seed, workdir, lr=lr, steps=steps)
    t = run_config.train
    tokens_per_step = t.batch_size * t.seq_len
    signature = run_config.to_dict()
    for key in ("workdir", "checkpoint"):
        signature.pop(key)
    signature["train"] = {k: v for k, v in signature["train"].items() if k not in ("progress", "log_every")}

    def train() -> dict:
        t0 = time.perf_counter()
        record = {"method": method, "seed": seed, "lr": run_config.optim.lr, "steps": t.steps,
                  "tokens_per_step": tokens_per_step, "diverged": None}
        try:
            result = recipes.run(run_config, "pretrain")
        except loop.TrainingDiverged as e:
            print(f"{method} at lr {run_config.optim.lr:g} (seed {seed}) diverged: {e}", flush=True)
            return {**record, "wall_s": time.perf_counter() - t0, "eval": [], "train_loss": [], "merges": [],
                    "diverged": str(e).splitlines()[0]}
        if result.preempted:
            raise SystemExit(f"{method} seed {seed} was preempted; run the same command again to resume")
        return {
            **record,
            "trainable_params": adapters_lib.count_params(result.state.trainables),
            "adapter_params": adapters_lib.count_params(result.state.trainables["adapters"]),
            "wall_s": time.perf_counter() - t0,
            "eval": _eval_curve(result.history, tokens_per_step),
            "train_loss": [(r["step"], r["loss"]) for r in result.history if "loss" in r],
            "merges": [r for r in result.history if r.get("remora_merge")],
        }

    return cached_run(workdir, train, signature)


def _final_loss(record) -> float:
    """A sweep run's score: its eval loss at the end (infinite if it diverged or did not evaluate there)."""
    if record["diverged"] or not record["eval"] or record["eval"][-1][0] != record["steps"] * record["tokens_per_step"]:
        return np.inf
    loss = float(record["eval"][-1][1])
    return loss if np.isfinite(loss) else np.inf


def sweep(config, method: str, workdir: pathlib.Path, progress: runs_lib.Progress | None = None) -> dict:
    """Train ``method`` at each rate of ``experiment.lrs[method]`` for ``experiment.sweep_steps`` steps at
    seed ``config.seed``; the chosen rate is the one with the lowest final eval loss (ties: the smaller)."""
    e = config.experiment
    steps, lrs = int(e.sweep_steps), sorted({float(x) for x in e.lrs[method]})
    records = []
    for lr in lrs:
        folder = workdir / "sweep" / method / f"lr{lr:g}"
        cached = (folder / runs_lib.DONE).exists()
        if progress:
            progress.run(f"sweep {method} lr={lr:g}", steps, cached)
        records.append(run_one(config, method, int(config.seed), folder, lr=lr, steps=steps))
        if progress:
            progress.finished(steps, trained=not cached)
    scores = [_final_loss(r) for r in records]
    if all(np.isinf(scores)):
        raise SystemExit(f"every learning rate of {method}'s sweep ({', '.join(f'{x:g}' for x in lrs)}) diverged or "
                         f"did not evaluate: lower experiment.lrs.{method}")
    chosen = min(zip(scores, lrs))[1]
    return {"lrs": lrs, "steps": steps, "runs": records, "scores": scores, "chosen_lr": chosen,
            "at_edge": chosen in (min(lrs), max(lrs))}


def compare(config, methods=METHODS, seeds=(0,)) -> dict:
    """Sweep each method's learning rate, run every method for every seed at its chosen rate and write
    the comparison's artifacts into ``config.workdir``."""
    for method in methods:
        method_config(config, method, seeds[0], pathlib.Path(config.workdir))  # a bad method or setting: before any run
    check_sweep(config, methods)
    started = provenance(seeds)  # the code that runs: later commits while it runs do not count
    workdir = pathlib.Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs_lib.enable_compilation_cache(workdir / "compilation_cache")
    steps, sweep_steps = int(config.train.steps), int(config.experiment.sweep_steps)
    n_sweep = sum(len(set(config.experiment.lrs[m])) for m in methods)
    progress = runs_lib.Progress(n_sweep * sweep_steps + len(methods) * len(seeds) * steps,
                                 n_sweep + len(methods) * len(seeds))
    sweeps = {m: sweep(config, m, workdir, progress) for m in methods}
    runs = []
    for s in seeds:  # seed by seed, so the first seeds' results are complete while later ones still train
        for m in methods:
            lr, folder = sweeps[m]["chosen_lr"], workdir / m / f"seed{s}"
            if sweep_steps == steps and s == int(config.seed):  # a full-length sweep already ran this one
                folder = workdir / "sweep" / m / f"lr{lr:g}"
            cached = (folder / runs_lib.DONE).exists()
            progress.run(f"{m} lr={lr:g} seed {s}", steps, cached)
            runs.append(run_one(config, m, s, folder, lr=lr))
            progress.finished(steps, trained=not cached)
    results = {"methods": list(methods), "seeds": list(seeds), "runs": runs, "sweep": sweeps,
               "sweep_steps": sweep_steps, "config": config.to_dict(), "provenance": started}
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (workdir / "results.md").write_text(results_markdown(results))
    plot_perplexity(results, workdir / "perplexity.png")
    plot_sweep(results, workdir / "sweep.png")
    plot_diagnostics(results, workdir / "remora_diagnostics.png")
    return results


def _by_method(results):
    out: dict[str, list[dict]] = {}
    for run in results["runs"]:
        out.setdefault(run["method"], []).append(run)
    return out


def results_markdown(results) -> str:
    """Eval perplexity at each evaluated token count (mean ± sample std over seeds), final eval loss,
    trainable parameters, the chosen learning rate and wall time per method; then the sweep."""
    by_method = _by_method(results)
    finished = [r for r in results["runs"] if not r["diverged"]]
    tokens = [e[0] for e in finished[0]["eval"]] if finished else []
    sweeps = results.get("sweep", {})
    head = "| method | trainable params | lr (chosen) | " + " | ".join(f"ppl @ {t / 1e6:.2f}M tok" for t in tokens)
    lines = [head + " | final eval loss | wall time (s) |", "|---|---:|---:|" + "---:|" * len(tokens) + "---:|---:|"]
    for method in results["methods"]:
        runs = [r for r in by_method[method] if not r["diverged"]]
        diverged = len(by_method[method]) - len(runs)
        lr = f"{sweeps[method]['chosen_lr']:.0e}{' (edge)' if sweeps[method]['at_edge'] else ''}" if method in sweeps \
            else f"{by_method[method][0]['lr']:.0e}" if "lr" in by_method[method][0] else "—"
        if not runs:
            lines.append(f"| {LABELS[method]} | — | {lr} | " + " | ".join("—" for _ in tokens)
                         + f" | all {diverged} diverged | — |")
            continue
        ppl = [mean_std([r["eval"][i][2] for r in runs]) for i in range(len(tokens))]
        note = f" ({diverged} diverged)" if diverged else ""
        lines.append(f"| {LABELS[method]} | {runs[0]['trainable_params']:,} | {lr} | " + " | ".join(ppl)
                     + f" | {mean_std([r['eval'][-1][1] for r in runs])}{note} | {mean_std([r['wall_s'] for r in runs])} |")
    if sweeps:
        lines += ["", f"Learning-rate sweep: {results['sweep_steps']} steps at seed {results['seeds'][0]}, eval loss at its "
                  "end (lower is better; the chosen rate in bold; \"edge\": the best rate is the grid's smallest or "
                  "largest, so a wider grid might do better):", ""]
        for method in results["methods"]:
            sw = sweeps[method]
            cells = [("diverged" if np.isinf(score) else f"{score:.3f}", lr) for score, lr in zip(sw["scores"], sw["lrs"])]
            lines.append(f"- {LABELS[method]}: " + ", ".join(
                f"**{lr:.0e}: {text}**" if lr == sw["chosen_lr"] else f"{lr:.0e}: {text}" for text, lr in cells))
    return ("\n".join(lines) + "\n\n" + provenance_markdown(results["provenance"]) + "\n")


def plot_sweep(results, path: pathlib.Path) -> None:
    """Each method's sweep: eval loss after ``sweep_steps`` against the peak learning rate."""
    if results.get("sweep"):
        runs_lib.plot_sweep({LABELS[m]: [(lr, s) for lr, s in zip(results["sweep"][m]["lrs"], results["sweep"][m]["scores"])
                                         if np.isfinite(s)] for m in results["methods"]},
                            f"eval loss after {results['sweep_steps']} steps", path)


def plot_perplexity(results, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, runs in _by_method(results).items():
        runs = [r for r in runs if not r["diverged"]]
        if not runs:
            continue
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
        if run["diverged"]:
            continue
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


__all__ = ["METHODS", "check_sweep", "compare", "method_config", "results_markdown", "run_one", "sweep"]
