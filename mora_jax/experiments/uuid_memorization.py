"""The UUID memorization experiment (the paper's headline table), reusable from code and tests.

``run_uuid_memorization(config)`` pre-trains a small LLaMA-style base on fresh random pairs, then
fine-tunes it on a fixed set of pairs with every method in ``config.methods`` and measures the
character accuracy of generating each value from its key at ``config.eval_steps``. It writes
``results.json``, ``results.md`` and ``results.png`` into ``config.workdir`` and returns the results.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from mora_jax import adapters as adapters_lib
from mora_jax import loop, metrics
from mora_jax.experiments import uuid_task
from mora_jax.experiments.provenance import provenance, provenance_markdown
from mora_jax.hf.checkpoints import load_llama, save_llama
from mora_jax.methods import FullConfig, LoRAConfig, MoRAConfig
from mora_jax.models.config import LlamaConfig
from mora_jax.models.llama import LlamaForCausalLM, init_params
from mora_jax.quant.config import QuantConfig
from mora_jax.run_config import CheckpointConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig


def model_config(config) -> LlamaConfig:
    m = config.model
    return LlamaConfig(
        vocab_size=uuid_task.VOCAB_SIZE, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, max_position_embeddings=uuid_task.SEQ_LEN,
        dtype=m.dtype, bos_token_id=uuid_task.BOS, eos_token_id=uuid_task.EOS, pad_token_id=uuid_task.PAD,
    )


def adapter_config(spec, targets: str):
    if spec.method == "full":
        return FullConfig(targets=(r".*",))  # every parameter, as in the paper's full fine-tuning
    if spec.method == "lora":
        return LoRAConfig(r=int(spec.r), alpha=float(spec.alpha), targets=(targets,))
    if spec.method == "mora":
        return MoRAConfig(r=int(spec.r), mora_type=int(spec.mora_type), targets=(targets,))
    raise ValueError(f"unknown method {spec.method!r} in config.methods: use full, lora or mora")


def run_config(method_config, *, steps, lr, warmup, weight_decay, seed, workdir, batch_size,
               quantize=None) -> RunConfig:
    """One training run of the experiment: constant learning rate after warm-up, clipping at 1, no
    checkpoints; the base's projections stored as ``quantize`` says (a ``model.quantize`` section)."""
    return RunConfig(
        seed=seed, workdir=str(workdir), adapter=method_config,
        model=ModelConfig(quantize=QuantConfig.from_value(None if quantize is None else dict(quantize))),
        optim=OptimConfig(lr=lr, warmup_steps=min(warmup, steps), decay="constant", weight_decay=weight_decay),
        train=TrainConfig(steps=steps, batch_size=batch_size, seq_len=uuid_task.SEQ_LEN,
                          log_every=max(1, min(50, steps // 10)), progress=False),
        checkpoint=CheckpointConfig(every=0),
    )


def _pretrain_signature(config) -> dict:
    model = {k: v for k, v in config.model.to_dict().items() if k != "quantize"}  # the base trains in float
    return {"seed": config.seed, "model": model, "steps": config.pretrain_steps,
            "lr": config.pretrain_lr, "batch_size": config.batch_size, "warmup_steps": config.warmup_steps}


def pretrain_base(config, model, workdir: pathlib.Path):
    """The base model: trained on fresh random pairs, so it knows the format but no pair.

    Saved as a Hugging Face checkpoint in ``config.base_dir`` (default ``workdir/base_model``) and
    reused by later runs with the same pretraining settings."""
    params = init_params(model.config, jax.random.key(config.seed))
    if not config.pretrain_steps:
        return params
    base_dir = pathlib.Path(config.get("base_dir") or workdir / "base_model")
    signature_file = base_dir / "uuid_pretraining.json"
    if signature_file.exists() and json.loads(signature_file.read_text()) == _pretrain_signature(config):
        print(f"reusing the pre-trained base model in {base_dir}", flush=True)
        return load_llama(base_dir, dtype=model.config.dtype)[1]
    result = loop.run(
        model, params,
        run_config(FullConfig(targets=(r".*",)), steps=config.pretrain_steps, lr=config.pretrain_lr,
                   warmup=config.warmup_steps, weight_decay=0.0, seed=config.seed, workdir=workdir / "base",
                   batch_size=config.batch_size),
        train_batches=uuid_task.RandomPairBatches(config.batch_size, seed=config.seed + 1000),
    )
    params = result.state.params()
    save_llama(base_dir, model, params, overwrite=True)
    signature_file.write_text(json.dumps(_pretrain_signature(config), indent=2) + "\n")
    return params


def run_uuid_memorization(config, seeds=None) -> dict:
    """The experiment for each of ``seeds`` (default: ``config.seed`` alone; each seed draws its own
    pairs, base model and adapters), with the accuracy table as mean ± sample standard deviation
    over seeds. One seed writes into ``config.workdir``; several write ``seed<k>/`` folders there
    and the aggregate beside them. Every results file records its provenance."""
    seeds = tuple(seeds) if seeds else (int(config.seed),)
    workdir = pathlib.Path(config.workdir)
    if len(seeds) == 1:
        one = config.copy_and_resolve_references()
        one.seed = seeds[0]
        return _run_seed(one, workdir, seeds)
    per_seed = []
    for seed in seeds:
        one = config.copy_and_resolve_references()
        one.seed, one.workdir = seed, str(workdir / f"seed{seed}")
        per_seed.append(_run_seed(one, pathlib.Path(one.workdir), (seed,)))
    results = {**{k: v for k, v in per_seed[0].items() if k not in ("methods", "provenance")},
               "seeds": list(seeds), "provenance": provenance(seeds),
               "total_s": sum(r["total_s"] for r in per_seed), "methods": []}
    for i, row in enumerate(per_seed[0]["methods"]):
        rows = [r["methods"][i] for r in per_seed]
        values = {step: [r["char_accuracy"][step] for r in rows] for step in row["char_accuracy"]}
        results["methods"].append({**row, "seconds": sum(r["seconds"] for r in rows),
                                   "char_accuracy": {k: float(np.mean(v)) for k, v in values.items()},
                                   "char_accuracy_seeds": values})
    write_results(results, workdir)
    return results


def _run_seed(config, workdir: pathlib.Path, seeds) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    model = LlamaForCausalLM(model_config(config))
    pairs = uuid_task.make_pairs(config.num_pairs, seed=config.seed)
    prompts = jnp.asarray(uuid_task.encode_pairs(pairs)["input_ids"][:, : uuid_task.PROMPT_LEN])
    eval_steps = sorted(int(s) for s in config.eval_steps)

    t0 = time.perf_counter()
    base_params = pretrain_base(config, model, workdir)
    base_seconds = time.perf_counter() - t0

    def generate(state):  # KV-cache greedy decoding (mora_jax.generate), adapters unmerged
        return uuid_task.greedy_values(model, prompts, params=state.params(), adapters=state.adapters)

    results = {"config": config.to_dict(), "num_pairs": len(pairs), "base_pretrain_s": base_seconds,
               "eval_steps": eval_steps, "seeds": list(seeds), "provenance": provenance(seeds), "methods": []}
    names = [n.strip() for n in str(config.run).split(",") if n.strip()]
    unknown = [n for n in names if n not in config.methods]
    if unknown:
        raise ValueError(f"config.run names {unknown}, which are not in config.methods ({sorted(config.methods)})")
    for name in names:
        spec = config.methods[name]
        method_config = adapter_config(spec, config.targets)
        accuracy: dict[int, float] = {}

        def on_step(step, state, log, accuracy=accuracy):
            if step in eval_steps:
                accuracy[step] = uuid_task.char_accuracy(generate(state), pairs)
                log({"char_accuracy": accuracy[step]})

        t = time.perf_counter()
        run = loop.run(
            model, base_params,
            run_config(method_config, steps=eval_steps[-1], lr=spec.lr, warmup=config.warmup_steps,
                       weight_decay=config.weight_decay, seed=config.seed, workdir=workdir / name,
                       batch_size=config.batch_size, quantize=config.model.get("quantize")),
            train_batches=uuid_task.PairBatches(pairs, config.batch_size, seed=config.seed), callbacks=[on_step],
        )
        metrics.plot_loss_curve(run.history, workdir / name / "loss_curve.png", title=f"{name} training loss")
        n_trainable = adapters_lib.count_params(run.state.trainables)
        row = {"name": name, "method": spec.method, "r": spec.r, "mora_type": spec.mora_type, "lr": spec.lr,
               "trainable_params": n_trainable, "seconds": time.perf_counter() - t,
               "final_loss": next((r["loss"] for r in reversed(run.history) if "loss" in r), None),
               "char_accuracy": {str(k): v for k, v in sorted(accuracy.items())}}
        results["methods"].append(row)
        print(f"{name}: " + ", ".join(f"{k}: {v:.1f}%" for k, v in sorted(accuracy.items())), flush=True)
    results["total_s"] = time.perf_counter() - t0
    write_results(results, workdir)
    return results


def _label(row) -> str:
    if row["method"] == "full":
        return "full fine-tuning"
    kind = "LoRA" if row["method"] == "lora" else f"MoRA (type {row['mora_type']})"
    return f"{kind} r={row['r']}"


def _cell(row, step) -> str:
    spread = row.get("char_accuracy_seeds", {}).get(str(step))
    if spread and len(spread) > 1:
        return f"{np.mean(spread):.1f} ± {np.std(spread, ddof=1):.1f}"
    value = row["char_accuracy"].get(str(step))
    return "" if value is None else f"{value:.1f}"


def results_markdown(results) -> str:
    """Accuracy per method and step (mean ± sample std over seeds when there are several), then the
    seeds, machine, software and commit that produced it."""
    steps = results["eval_steps"]
    lines = ["| method | trainable params | " + " | ".join(str(s) for s in steps) + " |",
             "|---|---:|" + "---:|" * len(steps)]
    for row in results["methods"]:
        lines.append(f"| {_label(row)} | {row['trainable_params']:,} | " + " | ".join(_cell(row, s) for s in steps) + " |")
    text = "\n".join(lines) + "\n"
    quantize = results.get("config", {}).get("model", {}).get("quantize") or {}
    if quantize.get("format", "none") != "none":
        text += (f"\nThe base's projections stored as {quantize['format']}"
                 + (f" (blocks of {quantize['block_size']})" if quantize["format"] in ("int4", "nf4") else "")
                 + " while the methods fine-tune (docs/quantization.md).\n")
    if results.get("provenance"):
        text += "\n" + provenance_markdown(results["provenance"]) + "\n"
    return text


def write_results(results, workdir: pathlib.Path) -> None:
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    header = (f"Character accuracy (%) of generating the value from its key, {results['num_pairs']} UUID pairs, "
              f"after N training steps.\n\n")
    (workdir / "results.md").write_text(header + results_markdown(results))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in results["methods"]:
        steps = [int(s) for s in row["char_accuracy"]]
        line, = ax.plot(steps, list(row["char_accuracy"].values()), "o-", label=_label(row))
        spread = row.get("char_accuracy_seeds")
        if spread:  # min–max over seeds
            ax.fill_between(steps, [min(spread[str(s)]) for s in steps], [max(spread[str(s)]) for s in steps],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("character accuracy (%)")
    ax.set_ylim(0, 101)
    ax.set_title("Memorizing UUID pairs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(workdir / "results.png", dpi=110)
    plt.close(fig)
