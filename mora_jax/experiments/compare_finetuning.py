"""The paper's fine-tuning experiments on a pretrained model, each method at its own tuned learning rate.

For every method of ``config.experiment.methods`` that is asked for (full fine-tuning, LoRA, MoRA
type 1 and type 6 at equal trainable parameters, or any method ``mora_jax.methods.METHODS``
knows), the comparison

1. sweeps the method's learning rates (``lrs``, at least four, log-spaced) on a short budget
   (``experiment.sweep_steps``) at the first seed and picks the best by the task's validation
   metrics (:mod:`mora_jax.experiments.finetune_tasks`);
2. trains ``train.steps`` at the chosen rate for every seed and evaluates the test split at
   ``experiment.eval_steps``.

A sweep needs no recompilation: the peak learning rate lives in the optimizer state
(``optim.lr_in_state``), one set of compiled steps serves every rate and seed of a method, and
compiled programs are kept in ``<workdir>/compilation_cache`` for the next invocation. The base
model is loaded once.

Every run has its folder (``sweep/<method>/lr<lr>``, ``<method>/seed<k>``) and, once finished, its
``done.json``: running the same command again skips finished runs and resumes an interrupted one
from its last checkpoint (``checkpoint.every``). The comparison writes ``results.json`` (every
run's metrics, the sweep, the base model's scores, the config and provenance), ``results.md``
(mean ± std over seeds, the chosen rates, the sweep) and ``results.png`` / ``sweep.png``.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import time

import jax
import numpy as np

from mora_jax import adapters as adapters_lib
from mora_jax import assembly, loop
from mora_jax import data as data_lib
from mora_jax.experiments import finetune_tasks, runs
from mora_jax.experiments.provenance import provenance, provenance_markdown
from mora_jax.models.llama import LlamaForCausalLM
from mora_jax.run_config import RunConfig

MIN_SWEEP_LRS = 4


def _plain(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else json.loads(json.dumps(config))


def method_names(config, methods=None) -> tuple[str, ...]:
    """The methods to compare: ``methods`` (names of ``experiment.methods``) or ``experiment.run``."""
    known = dict(config.experiment.methods)
    names = tuple(methods) if methods else tuple(m.strip() for m in str(config.experiment.run).split(",") if m.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"--methods: unknown {unknown or 'none given'}; this experiment defines {','.join(known)}")
    return names


def check_config(config, names) -> None:
    """One clear line for an experiment that cannot run as configured."""
    e = config.experiment
    if not config.model.hf_path:
        raise ValueError("model.hf_path is empty: the comparison fine-tunes a pretrained model; run "
                         "python -m train.get_model smollm2-135m-instruct or set --config.model.hf_path")
    if not (pathlib.Path(config.model.hf_path) / "config.json").is_file():
        raise FileNotFoundError(f"model.hf_path={config.model.hf_path} holds no config.json: fetch the model with "
                                "python -m train.get_model smollm2-135m-instruct or point it at a Hugging Face directory")
    for name in names:
        form = e.methods[name].get("model", {}).get("hf_path", "")
        if form and not pathlib.Path(form).exists():
            raise FileNotFoundError(f"experiment.methods.{name}.model.hf_path={form} does not exist: a GGUF file is kept "
                                    "beside the model by python -m train.get_model smollm2-135m-instruct (run it again "
                                    "for a cache made without it), or point the field at another base")
        source = e.methods[name].get("lr_from", "")
        if source:
            if source not in names or e.methods[source].get("lr_from", ""):
                raise ValueError(f"experiment.methods.{name}.lr_from={source!r}: name a method of this comparison "
                                 f"({','.join(names)}) that sweeps its own rates (add it to --methods)")
            continue
        lrs = [float(x) for x in e.methods[name].lrs]
        if len(lrs) < MIN_SWEEP_LRS or len(set(lrs)) != len(lrs):
            raise ValueError(f"experiment.methods.{name}.lrs has {len(set(lrs))} distinct rates; the sweep needs at "
                             f"least {MIN_SWEEP_LRS}, e.g. (1e-4, 3e-4, 1e-3, 3e-3)")
    steps = sorted(int(s) for s in e.eval_steps)
    if not steps or steps[0] < 1 or steps[-1] > config.train.steps:
        raise ValueError(f"experiment.eval_steps={tuple(e.eval_steps)} must lie in [1, train.steps={config.train.steps}]")
    if not 1 <= e.sweep_steps:
        raise ValueError(f"experiment.sweep_steps must be >= 1, got {e.sweep_steps}")


def _task_settings(config) -> dict:
    """The experiment's fields that decide the task's data (not the methods, rates or step counts)."""
    e = _plain(config)["experiment"]
    return {k: v for k, v in e.items() if k not in ("methods", "run", "eval_steps", "sweep_steps", "label")}


def signature(config, rc: RunConfig | None, **extra) -> dict:
    """What a run's record depends on: its run config (but where it is written, how often it logs or
    saves, and what a merge into a quantized base would do when the run does not merge), the task's
    data settings, ``extra``."""
    run = {}
    if rc is not None:
        run = rc.to_dict()
        run.pop("workdir")
        run.pop("checkpoint")
        run["train"] = {k: v for k, v in run["train"].items() if k not in ("progress", "log_every")}
        if not rc.remora.every:  # records made before model.quantize.merge existed stay valid
            run["model"]["quantize"].pop("merge", None)
    return {"run": run, "task": _task_settings(config), "model": config.model.hf_path, **extra}


def run_config(config, name: str, *, lr: float, seed: int, steps: int, workdir: pathlib.Path) -> RunConfig:
    """The run config of method ``name`` at learning rate ``lr``: the experiment's run settings,
    the method's adapter fields over ``adapter``, the peak learning rate in the optimizer state."""
    c = _plain(config)
    spec = c.pop("experiment")["methods"][name]
    c["method"] = spec["method"]
    c["adapter"] = {**c["adapter"], **spec.get("adapter", {})}
    for key, value in spec.get("model", {}).items():  # the base's form: model.hf_path, model.quantize, ...
        c["model"][key] = {**c["model"][key], **value} if isinstance(value, dict) else value
    c["seed"], c["workdir"] = int(seed), str(workdir)
    c["optim"].update(lr=float(lr), lr_in_state=True, warmup_steps=min(int(c["optim"]["warmup_steps"]), steps))
    c["train"]["steps"] = int(steps)
    c["export"] = {"adapter": False, "merged": False}
    return RunConfig.from_dict(c)


def base_form(rc: RunConfig) -> tuple:
    """Which base a run trains on: its ``model.hf_path`` and ``model.quantize`` (loaded and scored once each)."""
    return rc.model.hf_path, repr(rc.model.quantize)


class Comparison:
    """The model, its weights (loaded once), the task and the compiled steps of each method."""

    def __init__(self, config, workdir: pathlib.Path):
        self.config, self.workdir = config, workdir
        self.tokenizer = data_lib.Tokenizer(config.data.tokenizer or config.model.hf_path)
        probe = run_config(config, list(config.experiment.methods.keys())[0], lr=1.0, seed=0, steps=1, workdir=workdir)
        self.mesh = assembly.make_mesh(probe)
        self.model_config = assembly.model_config(probe)
        assembly.check_vocab(probe, self.model_config, self.tokenizer.vocab_size)
        self.tokenizer.check_fits(self.model_config.vocab_size, bos_token_id=self.model_config.bos_token_id,
                                  eos_token_id=self.model_config.eos_token_id, model=config.model.hf_path)
        self.model = LlamaForCausalLM(self.model_config)
        self.layout = assembly.scan_layout(self.model)
        self._params = {}
        self.params(probe)
        self.task = finetune_tasks.make_task(config, self.tokenizer, workdir / "data")
        self._steps: dict = {}

    def params(self, rc: RunConfig):
        """The base weights of ``rc`` (its ``model.hf_path`` and ``model.quantize``), loaded once per form."""
        key = base_form(rc)
        if key not in self._params:
            self._params[key] = assembly.load_params(rc, self.model_config)
        return self._params[key]

    def steps(self, rc: RunConfig):
        """The compiled steps of ``rc``, shared by runs that differ in learning rate or seed only (with
        ReMoRA merges the rate too: a merge's fresh optimizer state takes it from the steps' optimizer)."""
        key = (repr(rc.adapter), repr(rc.model.quantize), rc.train.steps, repr(rc.optim.schedule_shape()), repr(rc.step_config()),
               repr(rc.remora), rc.optim.lr if rc.remora.every else None)
        if key not in self._steps:
            self._steps[key] = assembly.build_steps(rc, self.model, self.mesh)
        return self._steps[key]

    def param_counts(self, rc: RunConfig) -> dict:
        state = jax.eval_shape(lambda p: assembly.initial_state(p, rc, self.layout), self.params(rc))
        return {"trainable_params": adapters_lib.count_params(state.trainables),
                "adapter_params": adapters_lib.count_params(state.trainables["adapters"])}

    def evaluate_base(self, rc: RunConfig) -> dict:
        """The pretrained model's scores (a fresh adapter changes nothing) on both splits."""
        steps = self.steps(rc)
        state = steps.place(assembly.initial_state(self.params(rc), rc, self.layout))
        return {split: self.task.evaluate(self.model, steps, state, split) for split in ("valid", "test")}

    def train(self, name: str, *, lr: float, seed: int, steps: int, eval_steps, split: str,
              workdir: pathlib.Path) -> dict:
        """One run of method ``name``; its record (evaluations by step, losses, time)."""
        rc = run_config(self.config, name, lr=lr, seed=seed, steps=steps, workdir=workdir)
        eval_steps = sorted({int(s) for s in eval_steps} | {steps})

        def on_step(step, state, log):
            if step in eval_steps:
                log({f"eval/{k}": v for k, v in self.task.evaluate(self.model, compiled, state, split).items()})

        compiled = self.steps(rc)
        record = {"name": name, "method": rc.method, "lr": lr, "seed": seed, "steps": steps, "split": split,
                  **self.param_counts(rc), "diverged": None}
        t0 = time.perf_counter()
        try:
            result = loop.run(self.model, self.params(rc), rc, train_batches=self.task.train_batches(seed),
                              callbacks=[on_step], layout=self.layout, mesh=self.mesh, steps=compiled,
                              frozen_source=rc.model.hf_path)
        except loop.TrainingDiverged as e:
            print(f"{name} at lr {lr:g} diverged: {e}", flush=True)
            return {**record, "diverged": str(e), "wall_s": time.perf_counter() - t0, "eval": {}, "train_loss": []}
        if result.preempted:
            raise SystemExit(f"{name} (lr {lr:g}, seed {seed}) was stopped; run the same command again to resume")
        evals: dict[str, dict] = {}
        for row in result.history:
            values = {k[len("eval/"):]: v for k, v in row.items() if k.startswith("eval/")}
            if values:
                evals.setdefault(str(row["step"]), {}).update(values)
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)  # the record is kept; resuming needs no state
        return {**record, "wall_s": time.perf_counter() - t0, "eval": evals,
                "train_loss": [(r["step"], r["loss"]) for r in result.history if "loss" in r]}


def _score(record, select, step) -> tuple:
    """Sort key of a sweep run (smaller is better): its validation metrics at ``step``, diverged last."""
    values = record["eval"].get(str(step))
    if record["diverged"] or not values:
        return (math.inf,) * len(select)
    key = []
    for metric, higher in select:
        v = float(values[metric])
        key.append(math.inf if not math.isfinite(v) else (-v if higher else v))
    return tuple(key)


def choose_lr(records, select, step) -> float:
    """The learning rate of the best sweep run (the task's ``select`` metrics, in order)."""
    return min(records, key=lambda r: (_score(r, select, step), r["lr"]))["lr"]


def compare(config, methods=None, seeds=(0,), command: str = "") -> dict:
    """Sweep, choose and train every method for every seed; write the artifacts into ``config.workdir``."""
    names = method_names(config, methods)
    check_config(config, names)
    e = config.experiment
    started = provenance(seeds)  # the code that runs: later commits while it runs do not count
    workdir = pathlib.Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs.enable_compilation_cache(workdir / "compilation_cache")
    cmp = Comparison(config, workdir)
    sweep_steps, train_steps = int(e.sweep_steps), int(config.train.steps)
    sources = {n: e.methods[n].get("lr_from", "") for n in names}  # a method may take another's chosen rate
    lrs = {n: [] if sources[n] else [float(x) for x in e.methods[n].lrs] for n in names}
    total_steps = sum(len(lrs[n]) for n in names) * sweep_steps + len(names) * len(seeds) * train_steps
    probes = {n: run_config(config, n, lr=1.0, seed=int(config.seed), steps=sweep_steps, workdir=workdir / "base")
              for n in names}  # each method's base: evaluated once per form (base_form)
    progress = runs.Progress(total_steps, len({base_form(rc) for rc in probes.values()})
                             + sum(len(lrs[n]) for n in names) + len(names) * len(seeds))

    def run(label, folder, steps, **kwargs):
        cached = (folder / runs.DONE).exists()
        progress.run(label, steps, cached)
        rc = run_config(config, kwargs["name"], lr=kwargs["lr"], seed=kwargs["seed"], steps=steps, workdir=folder)
        sig = signature(config, rc, eval_steps=sorted(int(s) for s in kwargs["eval_steps"]), split=kwargs["split"])
        record = runs.cached_run(folder, lambda: cmp.train(steps=steps, workdir=folder, **kwargs), sig)
        progress.finished(steps, trained=not cached)
        return record

    base_sig = signature(config, None, seq_len=config.train.seq_len, batch_size=config.train.batch_size)
    bases, base_of = {}, {}  # the pretrained model's scores per form of the base (model.hf_path, model.quantize)
    for name in names:
        rc = probes[name]
        form = base_form(rc)
        if form not in bases:  # the first form in workdir/base, another one (a quantized base) beside it
            folder = workdir / "base" if not bases else workdir / "base" / name
            progress.run(f"the pretrained model, before fine-tuning{f' ({name} base)' if bases else ''}", 0,
                         (folder / runs.DONE).exists())
            sig = base_sig if not bases else {**base_sig, "form": {"hf_path": rc.model.hf_path,
                                                                    "quantize": repr(rc.model.quantize)}}
            bases[form] = runs.cached_run(folder, lambda rc=rc: cmp.evaluate_base(rc), sig)
        base_of[name] = bases[form]
    base = base_of[names[0]]
    sweep = {}
    for name in [n for n in names if not sources[n]]:
        records = [run(f"sweep {name} lr={lr:g}", workdir / "sweep" / name / f"lr{lr:g}", sweep_steps, name=name,
                       lr=lr, seed=int(config.seed), eval_steps=(sweep_steps,), split="valid") for lr in lrs[name]]
        chosen = choose_lr(records, cmp.task.select, sweep_steps)
        sweep[name] = {"lrs": lrs[name], "runs": records, "chosen_lr": chosen,
                       "at_edge": chosen in (min(lrs[name]), max(lrs[name]))}
    for name in [n for n in names if sources[n]]:  # no sweep of its own: the rate its source chose
        sweep[name] = {**sweep[sources[name]], "runs": [], "lrs": [], "from": sources[name]}
    sweep = {n: sweep[n] for n in names}
    finals: dict[str, list] = {n: [] for n in names}
    for seed in seeds:  # seed by seed: the first seeds' table is complete while later ones train
        for name in names:
            lr = sweep[name]["chosen_lr"]
            finals[name].append(run(f"{name} lr={lr:g} seed {seed}", workdir / name / f"seed{seed}", train_steps,
                                    name=name, lr=lr, seed=int(seed), eval_steps=e.eval_steps, split="test"))
    results = {"label": e.get("label", ""), "task": cmp.task.name, "task_data": cmp.task.describe(), "methods": list(names), "seeds": list(seeds),
               "eval_steps": sorted({int(s) for s in e.eval_steps} | {train_steps}), "sweep_steps": sweep_steps,
               "columns": [list(c) for c in cmp.task.columns], "select": [list(s) for s in cmp.task.select],
               "labels": {n: label(e.methods[n]) for n in names}, "base": base, "base_by_method": base_of, "sweep": sweep, "runs": finals,
               "config": _plain(config), "command": command, "provenance": started,
               "model": {"hf_path": config.model.hf_path, "layers": cmp.model_config.num_hidden_layers,
                         "hidden": cmp.model_config.hidden_size, "vocab": cmp.model_config.vocab_size}}
    write_results(results, workdir)
    return results


def label(spec) -> str:
    """A method's name in tables: ``spec.label``, else from its method and adapter fields."""
    spec = _plain(spec)
    if spec.get("label"):
        return spec["label"]
    a = spec.get("adapter", {})
    if spec["method"] == "full":
        return "full fine-tuning"
    if spec["method"] == "lora":
        return f"LoRA r={a.get('r')}"
    if spec["method"] == "mora":
        return f"MoRA type {a.get('mora_type')}{' + magnitude' if a.get('magnitude') else ''} (r={a.get('r')})"
    if spec["method"] in ("dora", "pissa", "hira") and set(a) <= {"r", "alpha"}:
        return f"{ {'dora': 'DoRA', 'pissa': 'PiSSA', 'hira': 'HiRA'}[spec['method']]} r={a.get('r')}"
    return f"{spec['method']} " + " ".join(f"{k}={v}" for k, v in sorted(a.items()) if k not in ("targets", "unfreeze"))


def _cell(records, step, metric, digits=1) -> str:
    values = [r["eval"][str(step)][metric] for r in records
              if not r["diverged"] and metric in r["eval"].get(str(step), {})]
    diverged = sum(bool(r["diverged"]) for r in records)
    text = runs.mean_std(values, digits) if values else "—"
    return text + (f" ({diverged} diverged)" if diverged else "")


def results_markdown(results) -> str:
    """The table (mean ± sample std over seeds at each evaluated step), the base model, the sweep,
    and the provenance."""
    lines = [f"**{results['label']}**\n"] if results.get("label") else []
    base_test = results["base"]["test"]
    steps = results["eval_steps"]
    if results["task"] == "continual":
        ratio = base_test["domain_ppl"] / base_test["general_ppl"]
        verdict = "new to the model (≥ 2×)" if ratio >= 2 else "NOT new to the model by the ≥ 2× criterion"
        lines.append(f"Base model: domain perplexity {base_test['domain_ppl']:.2f}, general perplexity "
                     f"{base_test['general_ppl']:.2f}: the domain is {ratio:.2f}× as perplexing, {verdict}.\n")
    for metric, title, higher in results["columns"]:
        if metric not in base_test:  # e.g. a relation the questions do not ask
            continue
        head = "| method | trainable params | lr (chosen of sweep) | base | " + " | ".join(f"step {s}" for s in steps) + " |"
        lines += [f"**{title}** on the test split ({'higher' if higher else 'lower'} is better), mean ± std over "
                  f"{len(results['seeds'])} seed(s):\n", head, "|---|---:|---:|---:|" + "---:|" * len(steps)]
        for name in results["methods"]:
            recs, sw = results["runs"][name], results["sweep"][name]
            edge = " (edge)" if sw["at_edge"] else ""
            own_base = results.get("base_by_method", {}).get(name, results["base"])["test"]  # a quantized base: its own
            lines.append(f"| {results['labels'][name]} | {recs[0]['trainable_params']:,} | {sw['chosen_lr']:.0e}{edge} | "
                         f"{own_base[metric]:.1f} | " + " | ".join(_cell(recs, s, metric) for s in steps) + " |")
        lines.append("")
    metric, higher = results["select"][0]
    lines += [f"Learning-rate sweep: {results['sweep_steps']} steps at seed {results['seeds'][0]}, validation "
              f"{metric} ({'higher' if higher else 'lower'} is better; the chosen rate in bold; \"edge\": the best "
              "rate is the grid's smallest or largest, so a wider grid might do better):\n"]
    for name in results["methods"]:
        sw = results["sweep"][name]
        cells = []
        for r in sw["runs"]:
            value = r["eval"].get(str(results["sweep_steps"]), {}).get(metric)
            text = "diverged" if r["diverged"] else f"{value:.2f}"
            cells.append(f"**{r['lr']:.0e}: {text}**" if r["lr"] == sw["chosen_lr"] else f"{r['lr']:.0e}: {text}")
        if sw.get("from"):
            cells = [f"the rate chosen for {results['labels'][sw['from']]}, {sw['chosen_lr']:.0e}"]
        lines.append(f"- {results['labels'][name]}: " + ", ".join(cells))
    wall = sum(r["wall_s"] for recs in results["runs"].values() for r in recs)
    wall += sum(r["wall_s"] for sw in results["sweep"].values() for r in sw["runs"])
    lines += ["", f"Training and evaluation time of all runs: {wall / 60:.1f} min.", ""]
    if results.get("command"):
        lines.append(f"Command: `{results['command']}`\n")
    lines.append(provenance_markdown(results["provenance"]))
    return "\n".join(lines) + "\n"


def write_results(results, workdir: pathlib.Path) -> None:
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (workdir / "results.md").write_text(results_markdown(results))
    plot_results(results, workdir / "results.png")
    plot_sweep(results, workdir / "sweep.png")


def plot_results(results, path: pathlib.Path) -> None:
    """Each reported metric against training steps (step 0: the base model), mean and min–max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in results["columns"] if c[0] in results["base"]["test"]]
    fig, axes = plt.subplots(1, len(columns), figsize=(6 * len(columns), 4), squeeze=False)
    for ax, (metric, title, _) in zip(axes[0], columns):
        for name in results["methods"]:
            recs = [r for r in results["runs"][name] if not r["diverged"]]
            if not recs:
                continue
            steps = [0] + [s for s in results["eval_steps"] if str(s) in recs[0]["eval"]]
            own_base = results.get("base_by_method", {}).get(name, results["base"])["test"]
            values = np.array([[own_base[metric]] + [r["eval"][str(s)][metric] for s in steps[1:]]
                               for r in recs])
            line, = ax.plot(steps, values.mean(0), "o-", ms=3, label=results["labels"][name])
            if len(recs) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
        ax.set_xlabel("training step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(results, path: pathlib.Path) -> None:
    """The sweep's validation metric against the learning rate, one line per method."""
    metric, _ = results["select"][0]
    step = str(results["sweep_steps"])
    runs.plot_sweep({results["labels"][name]: [(r["lr"], r["eval"][step][metric]) for r in results["sweep"][name]["runs"]
                                               if not r["diverged"] and step in r["eval"]] for name in results["methods"]},
                    f"validation {metric} after {results['sweep_steps']} steps", path)


__all__ = ["Comparison", "check_config", "choose_lr", "compare", "label", "method_names", "results_markdown",
           "run_config", "write_results"]
