"""The paper's fine-tuning experiments on SmolLM2-135M-Instruct, each method at its own tuned
learning rate (docs/finetuning.md):

    python -m train.get_model smollm2-135m-instruct       # once: the model, as a Hugging Face directory
    python -m train.compare_finetuning --config=configs/smollm2_experiments.py:memorization_quick
    python -m train.compare_finetuning --config=configs/smollm2_experiments.py:continual_results --seeds=3

Presets, ``<experiment>_quick`` (minutes on two CPU cores: one seed, a few steps; a check that the
pipeline works, not a result), ``<experiment>_results`` (the run the docs' tables come from, sized to
finish in 30-60 minutes on two idle CPU cores with ``--seeds=3``: few steps, small evaluation sets)
and ``<experiment>_long`` (the same comparison at 10-50x the tokens: hours to a day on two cores,
minutes on an accelerator; not run here). Resume a run by running the same command again.

* ``memorization``: the paper's UUID key -> value pairs (needs nothing installed);
* ``continual``: continual pretraining on Indonesian technical prose (the Debian Reference's translation,
  ``debian-reference-id``), forgetting measured on its English original (``debian-reference-en``);
* ``word_relations``: antonym / hypernym questions from WordNet (``wordnet-base``), exact match on
  held-out words;
* ``quantized``: memorization with MoRA type 6 on the base in four forms (QMoRA, docs/quantization.md):
  float32 (the reference: the shipped Q4_1 file dequantized), the shipped Q4_1 blocks kept quantized
  (the GGUF file ``train.get_model`` keeps), int8 and NF4; one learning rate, the reference's.

``apt-get install -y debian-reference-id debian-reference-en wordnet-base`` gives every source.
Methods: ``experiment.methods`` (name -> method, adapter fields over ``adapter``, learning rates to
sweep); ``--methods`` picks some (default ``experiment.run``). LoRA and MoRA at the same ``r``
train the same number of parameters (MoRA's r̂ = round(sqrt((k+d)·r)) per kernel). The PEFT family at
the same ``r`` is defined too (``dora``, ``pissa``, ``hira``, ``mora6m`` = MoRA type 6 with a DoRA-style
magnitude; suffixed ``_r8`` / ``_r64`` in memorization): add them with ``--methods``, e.g.
``--methods=lora_r8,mora6_r8,dora_r8,pissa_r8,hira_r8,mora6m_r8``.
"""

import ml_collections

from configs.base import base_config
from configs.smollm2 import MODEL
from mora_jax.pretrained import gguf_path, model_dir


FULL_LRS = (1e-5, 3e-5, 1e-4, 3e-4)  # half-decade grids, four rates each
ADAPTER_LRS = (1e-4, 3e-4, 1e-3, 3e-3)


def _method(method: str, lrs, label: str = "", model=None, lr_from: str = "", **adapter):
    m = ml_collections.ConfigDict()
    m.method = method  # a mora_jax.methods.METHODS name: "full", "lora", "mora" (or any method added there)
    m.adapter = ml_collections.ConfigDict(adapter)  # fields over config.adapter (r, mora_type, alpha, targets...)
    m.lrs = tuple(lrs)  # peak learning rates the sweep tries (>= 4, log-spaced)
    m.label = label  # name in the tables ("" = from the method and its fields)
    m.model = ml_collections.ConfigDict(model or {})  # fields over config.model: the base's form (hf_path, quantize)
    m.lr_from = lr_from  # "" = sweep lrs; else the rate another method of the comparison chose (no sweep)
    return m


def _methods(ranks, adapter_lrs, full_lrs):
    methods = {"full": _method("full", full_lrs, targets=".*")}  # every parameter, as the paper's full fine-tuning
    for r in ranks:
        suffix = f"_r{r}" if len(ranks) > 1 else ""
        methods[f"lora{suffix}"] = _method("lora", adapter_lrs, r=r, alpha=2.0 * r)  # scale alpha/r = 2
        methods[f"mora1{suffix}"] = _method("mora", adapter_lrs, r=r, mora_type=1)  # the paper's type for large r
        methods[f"mora6{suffix}"] = _method("mora", adapter_lrs, r=r, mora_type=6)  # the paper's type for small r
        # The PEFT family at the same r (equal trainable parameters; DoRA adds d per kernel), opt-in with --methods:
        methods[f"dora{suffix}"] = _method("dora", adapter_lrs, r=r, alpha=2.0 * r)  # LoRA's scale, plus a magnitude
        methods[f"pissa{suffix}"] = _method("pissa", adapter_lrs, r=r, alpha=float(r))  # scale 1, as PEFT's PiSSA
        # HiRA's update is K ⊙ (A·B): its useful rates sit higher (PEFT's MetaMathQA run used 4.5e-3, 45x its
        # LoRA's), so its grid is LoRA's times 10
        methods[f"hira{suffix}"] = _method("hira", tuple(10.0 * x for x in adapter_lrs), r=r)
        methods[f"mora6m{suffix}"] = _method("mora", adapter_lrs, r=r, mora_type=6, magnitude=True)  # MoRA + magnitude
    return ml_collections.ConfigDict(methods)


def get_config(preset: str = "memorization_quick"):
    experiment, _, size = preset.rpartition("_")
    experiments = ("memorization", "continual", "word_relations", "quantized")
    if experiment not in experiments or size not in ("quick", "results", "long") or preset == "quantized_long":
        raise ValueError(f"unknown preset {preset!r}: use <experiment>_quick, <experiment>_results or "
                         f"<experiment>_long with <experiment> one of {', '.join(experiments[:3])}, or "
                         "quantized_quick / quantized_results")
    quick, long = size == "quick", size == "long"
    c = base_config()
    c.workdir = f"runs/compare_finetuning/{preset}"  # results.md/json/png, sweep.png, data/, one folder per run
    c.model.hf_path = str(model_dir(MODEL))  # the pretrained model, where python -m train.get_model writes it
    c.model.dtype = "float32"  # CPUs have no fast bfloat16 matmul
    c.model.param_dtype = "float32"
    c.model.scan_layers = True  # 30 layers as one scanned layer: compiles several times faster
    c.optim.decay = "cosine"  # warm-up, then cosine decay to 0 at the end of each run (sweep runs too)
    c.optim.weight_decay = 0.0
    c.train.log_every = 5
    c.train.progress = True  # a progress bar per run, beside the [k/n] run lines
    c.checkpoint.every = 0 if quick else 50  # a long run resumes from its last checkpoint
    c.checkpoint.keep = 1
    c.export.adapter = False

    e = c.experiment = ml_collections.ConfigDict()
    # memorization | continual | word_relations (mora_jax.experiments.finetune_tasks); "quantized" is memorization
    e.task = "memorization" if experiment == "quantized" else experiment
    e.label = (f"{preset}: a check that the pipeline works on the real model (a handful of steps, one seed); not a "
               "measurement" if quick else f"{preset}")  # the first line of results.md
    e.data_seed = 0  # which pairs / which questions (the runs' seeds change order and adapter init)
    if experiment == "quantized":
        # QMoRA: one MoRA fine-tune on the base in four forms. The reference is the float32 model the shipped
        # Q4_1 file dequantizes to; the others keep those blocks as shipped, or re-quantize the float weights.
        # One learning rate, the reference's (swept): the forms differ in the base only.
        mora = dict(r=8, mora_type=6)
        e.methods = ml_collections.ConfigDict({
            "float": _method("mora", (3e-4, 1e-3, 3e-3, 1e-2), label="MoRA 6 r=8, float32 base (reference)", **mora),
            "q4_1": _method("mora", (), label="MoRA 6 r=8, the shipped Q4_1 blocks kept", lr_from="float",
                            model={"hf_path": str(gguf_path(MODEL)), "quantize": {"format": "gguf"}}, **mora),
            "int8": _method("mora", (), label="MoRA 6 r=8, int8 base", lr_from="float",
                            model={"quantize": {"format": "int8"}}, **mora),
            "nf4": _method("mora", (), label="MoRA 6 r=8, NF4 base (blocks of 64)", lr_from="float",
                           model={"quantize": {"format": "nf4", "block_size": 64}}, **mora),
        })
        e.run = "float,q4_1,int8,nf4"
        c.data.tokenizer = str(model_dir(MODEL))  # a GGUF base (q4_1) takes its tokenizer from the converted directory
        # the results size: about 30 minutes per seed on two CPU cores (the four forms, the sweep once)
        e.num_pairs = 4 if quick else 16
        c.train.batch_size = 4
        c.train.seq_len = 80
        c.optim.decay = "constant"
        c.optim.warmup_steps = 2 if quick else 10
        e.sweep_steps = 5 if quick else 40
        c.train.steps = 20 if quick else 120
        e.eval_steps = (5, 10, 15, 20) if quick else (30, 60, 90, 120)
    elif experiment == "memorization":
        # LoRA against MoRA at a low and a high rank (equal trainable parameters at each), and full fine-tuning
        e.methods = _methods((8, 64), adapter_lrs=(3e-4, 1e-3, 3e-3, 1e-2), full_lrs=(3e-5, 1e-4, 3e-4, 1e-3))
        # MoRA type 1 at r=64 (r̂ = 1,024 on the 576-wide projections) learns best at the smallest rate of the
        # adapters' grid (memorization_results' sweep: 3e-4 ahead of 1e-3 and 3e-3), so its grid goes one lower
        e.methods.mora1_r64.lrs = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
        e.run = "full,lora_r8,mora6_r8,lora_r64,mora1_r64"  # the paper's pairing: type 6 at low r, type 1 at high r
        if not quick:  # and the PEFT family at the low rank (LoRA's parameter count)
            e.run += ",dora_r8,pissa_r8,hira_r8"
        c.train.seq_len = 80  # key (36 tokens) + " ->" + value (37) + EOS, with SmolLM2's tokenizer
        c.optim.decay = "constant"  # the four step counts are points along one run, as in the paper
        e.num_pairs, c.train.batch_size = {"quick": (4, 4), "results": (8, 4), "long": (64, 16)}[size]  # UUID pairs
        c.optim.warmup_steps = {"quick": 2, "results": 3, "long": 10}[size]
        e.sweep_steps = {"quick": 5, "results": 10, "long": 100}[size]
        c.train.steps = {"quick": 20, "results": 32, "long": 400}[size]
        e.eval_steps = tuple(c.train.steps * k // 4 for k in (1, 2, 3, 4))  # character accuracy measured here
    elif experiment == "continual":
        e.methods = _methods((8,), adapter_lrs=ADAPTER_LRS, full_lrs=FULL_LRS)
        # LoRA's and MoRA type 6's best of the four adapter rates was the largest, 3e-3 (continual_results'
        # sweep): one higher
        e.methods.lora.lrs = e.methods.mora6.lrs = ADAPTER_LRS + (1e-2,)
        e.run = "full,lora,mora1,mora6"
        # the Debian Reference in Indonesian (new to SmolLM2: 3.1x the perplexity of the English original) and in
        # English, its original (forgetting); apt-get install debian-reference-id debian-reference-en
        e.domain_source = "/usr/share/debian-reference/debian-reference.id.txt.gz"
        e.general_source = "/usr/share/debian-reference/debian-reference.en.txt.gz"
        e.eval_fraction = 0.1  # paragraphs held out of each corpus (by hash)
        e.train_rows = ml_collections.FieldReference(None, field_type=int)  # cap on the domain's training rows
        c.train.batch_size = 8 if long else 4
        c.train.seq_len = 256 if long else 128
        e.eval_batches = {"quick": 2, "results": 3, "long": 8}[size]  # batches per split: valid, test (domain), general
        c.optim.warmup_steps = {"quick": 2, "results": 4, "long": 20}[size]
        e.sweep_steps = {"quick": 4, "results": 8, "long": 60}[size]
        c.train.steps = {"quick": 12, "results": 24, "long": 240}[size]
        e.eval_steps = (4, 8, 12) if quick else tuple(c.train.steps * k // 4 for k in (1, 2, 3, 4))
    else:
        e.methods = _methods((8,), adapter_lrs=ADAPTER_LRS, full_lrs=FULL_LRS)
        # LoRA's best of the four adapter rates was the largest, 3e-3 (word_relations_results' sweep): one higher
        e.methods.lora.lrs = ADAPTER_LRS + (1e-2,)
        e.methods.full.lrs = FULL_LRS + (1e-3,)  # so was full fine-tuning's, 3e-4: one higher too
        e.run = "full,lora,mora1,mora6"
        e.wordnet_dir = "/usr/share/wordnet"  # apt-get install wordnet-base
        e.relations_file = ""  # or a JSONL file of questions (python -m train.make_word_relations)
        e.train_examples = 2000 if quick else 100000  # questions trained on (at most)
        e.eval_examples = {"quick": 32, "results": 64, "long": 500}[size]  # held-out questions per split (valid, test)
        e.max_new_tokens = 6  # generation budget per answer
        c.train.batch_size = 32 if long else 16
        c.train.seq_len = 24  # prompt + answer + EOS
        c.optim.warmup_steps = {"quick": 2, "results": 4, "long": 20}[size]
        e.sweep_steps = {"quick": 6, "results": 12, "long": 100}[size]
        c.train.steps = {"quick": 18, "results": 36, "long": 600}[size]
        e.eval_steps = (6, 12, 18) if quick else tuple(c.train.steps * k // 4 for k in (1, 2, 3, 4))
    return c
