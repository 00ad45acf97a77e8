"""Entry point: will this run fit a TPU slice, and how fast may it go? Compiled for the slice from a CPU machine.

    python -m train.plan --config=configs/c4_pretrain.py:1b --topology=v5e:2x4 [--out=plan.json]
    python -m train.plan --config=configs/math_finetune.py:llama2_7b_tpu --topology=v5e:2x4 --compare
    python -m train.plan --config=configs/c4_pretrain.py:250m --topology=v4:2x2x2 --search
    python -m train.plan ... --config.train.grad_accum=16 --config.mesh.fsdp=8   # any config field

Needs the ``tpu`` extra (``pip install -e '.[tpu]'``: libtpu). It compiles, for the slice and the
config's mesh, the train, eval and ReMoRA-merge steps a run of this config executes (the loop's own
step builder; no data, no tokenizer, no weights), prints a table and writes ``--out`` (JSON):

    {"topology", "chips", "hosts", "device_kind", "hbm_bytes_per_chip", "chip": {bf16_flops, hbm_bytes_per_s,
     ici_bytes_per_s, ici_ports, source}, "mesh": {axis: size}, "fits": bool, "run": {...},
     "state_bytes_per_chip": {frozen, trainables, opt_state},
     "steps": {"train" | "eval" | "merge": {                       # merge: null without ReMoRA merges
         "bytes_per_chip": {arguments, outputs, aliased, temp, code, total[, after_first_merge]},
         "fits", "compiled", "compile_s", "collectives": {kind: {count, bytes, wire_bytes, group_sizes}},
         "xla_flops", "xla_bytes_accessed",                          # XLA's cost analysis (loop bodies once)
         "hlo_matmul_flops", "hlo_hbm_bytes", "kernels", "kernel_flops", "loop_trip_counts",
         "roofline_s": {compute, memory, communication}, "estimated_step_s", "estimated_step_s_serial",
         "bound",                                                    # compute | memory | communication
         train only: "model_flops_per_step", "estimated_mfu", "estimated_tokens_per_s"}},
     "advice": [...], "compare": {method: {...}}, "search": [...],
     "command": "python -m train.plan ...", "provenance": {commit, packages (libtpu included), machine, date}}

Times and MFU are estimates (a roofline of the compiled step: mora_jax.plan.roofline), not
measurements. A plan that does not fit exits with status 1 after writing the JSON and says what to
change; bad input (unknown topology, libtpu missing, a mesh that does not cover the slice) is one
line on stderr and status 2.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from mora_jax import logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "run configuration (a configs/*.py file[:variant])")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, GENERATION:AxB[xC]: v5e:2x4, v4:2x2x2, v5p:2x2x1, v6e:4x4")
_OUT = flags.DEFINE_string("out", None, "JSON file to write")
_SEARCH = flags.DEFINE_bool("search", False, "try mesh shapes, remat policies and micro-batch counts; list those that fit")
_BUDGET = flags.DEFINE_integer("search_budget", 12, "--search: at most this many compiles")
_COMPARE = flags.DEFINE_list("compare", [], "also plan the same run with these methods (lora, full, mora) for a "
                                            "side-by-side table; bare --compare=all plans the other two")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", None, "write each compiled step's HLO text (what the plan's counts are "
                                 "read from) under this folder: <method>/<step>.hlo.txt")
_STEPS = flags.DEFINE_list("steps", ["train", "eval", "merge"], "steps to compile")


def _fail(message: str, status: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def main(argv):
    del argv
    logs.apply_verbosity_flag()  # other libraries' INFO lines only with --verbosity
    from mora_jax.plan import PlanError, advice, parse_topology, planner, report
    from mora_jax.plan import search as search_lib
    from mora_jax.run_config import RunConfig

    if _CONFIG.value is None:
        _fail("--config is required, e.g. --config=configs/c4_pretrain.py:1b")
    if not _TOPOLOGY.value:
        _fail("--topology is required, e.g. --topology=v5e:2x4 (GENERATION:AxB[xC] with GENERATION v4, v5e, v5p or v6e)")
    try:
        topology = parse_topology(_TOPOLOGY.value)
        config = RunConfig.from_dict(_CONFIG.value)
        methods = report.compare_methods(config.method, _COMPARE.value)
        if _SEARCH.value:
            found = search_lib.search(config, topology, budget=_BUDGET.value, progress=_progress)
            print(report.search_table(found), flush=True)
            best = next((r for r in found if r["fits"]), None)
            if best is not None:
                config = search_lib.with_choice(config, best["mesh"], best["remat_policy"], best["grad_accum"])
                print(f"planning the best: mesh {best['mesh']}, remat {best['remat_policy']}, "
                      f"{best['grad_accum']} micro-batches", flush=True)
        dump = (lambda method: os.path.join(_DUMP_HLO.value, method)) if _DUMP_HLO.value else (lambda method: None)
        result = planner.plan(config, topology, steps=tuple(_STEPS.value), progress=_progress,
                              hlo_dir=dump(config.method))
        if _SEARCH.value:
            result["search"] = found
        if methods:
            result["compare"] = {}
            for method in methods:
                other = report.with_method(config, method)
                result["compare"][method] = planner.plan(other, topology, steps=("train",), progress=_progress,
                                                         hlo_dir=dump(method))
    except PlanError as e:
        _fail(str(e))
    except ValueError as e:  # a config value refused by the config layer
        _fail(str(e))
    result["advice"] = advice.suggestions(result, config)
    note = advice.headroom_note(result)
    if note:
        result["headroom_note"] = note
    print(report.table(result), flush=True)
    if _OUT.value:
        from mora_jax.experiments.provenance import provenance

        result["command"] = " ".join(["python -m train.plan", *sys.argv[1:]])
        result["provenance"] = provenance()
        out = pathlib.Path(_OUT.value)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(planner.to_json(result))
        print(f"wrote {out}", flush=True)
    if not result["fits"]:
        sys.exit(1)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    app.run(main)
