"""The paper's UUID memorization experiment (arXiv 2405.12130; the method: docs/mora.md).

`python -m train.uuid_memorization --config configs/uuid_memorization.py[:tiny|:paper]`, any field
overridable, e.g. `--config.num_pairs=128 --config.methods.mora_small.lr=1e-2`.

Default: a small LLaMA-style model on two CPU cores in about ten minutes. It is first pre-trained
on fresh random pairs (it learns the format, not any pair), then fine-tuned on a fixed set of pairs
with full fine-tuning, LoRA and MoRA at a small and a large rank (equal trainable parameters for
LoRA and MoRA at each rank: r̂ = round(sqrt((k+d)·r))).
"""

import ml_collections


def _method(method, r=None, mora_type=None, lr=1e-3):
    m = ml_collections.ConfigDict()
    m.method = method  # "full", "lora" or "mora"
    m.r = r  # LoRA rank (MoRA matches its parameter count); None for full fine-tuning
    m.mora_type = mora_type  # MoRA operator type (6 for small r, 1 for large r, as the paper recommends)
    m.alpha = 2.0 * r if r else 0.0  # LoRA alpha (scale alpha/r = 2)
    m.lr = lr  # peak learning rate of this method
    return m


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds the pairs, the base model and the adapters
    c.workdir = "runs/uuid_memorization"  # results.md, results.json, results.png and one folder per method
    c.base_dir = ""  # where the pre-trained base model is cached (default: workdir/base_model)
    c.num_pairs = 16  # key -> value pairs to memorise
    c.batch_size = 16  # pairs per optimizer step (here: all of them)
    c.eval_steps = (300, 500, 700, 900)  # steps at which character accuracy is measured (the paper's)

    c.model = ml_collections.ConfigDict()
    c.model.hidden_size = 128  # LLaMA-style model; vocabulary = 21 UUID characters and specials
    c.model.intermediate_size = 344  # SwiGLU width
    c.model.num_hidden_layers = 2
    c.model.num_attention_heads = 4
    c.model.num_key_value_heads = 4
    c.model.dtype = "float32"  # compute dtype ("bfloat16" on accelerators)
    # QMoRA: the pre-trained base's projections stored quantized while LoRA / MoRA fine-tune on it
    # (docs/quantization.md); "full" cannot train a quantized kernel, so leave it out of `run` then
    c.model.quantize = ml_collections.ConfigDict()
    c.model.quantize.format = "none"  # "none", "int8", "int4", "nf4", "q8_0", "q4_0", "q4_1"
    c.model.quantize.block_size = 8  # int4 / nf4: input features per scale (must divide 128 and 344 here)

    c.pretrain_steps = 600  # base-model training on fresh random pairs (learns the format only)
    c.pretrain_lr = 3e-3  # its peak learning rate
    c.warmup_steps = 30  # linear warm-up of every fine-tuning run, then constant lr
    c.weight_decay = 0.0  # AdamW weight decay
    c.targets = r".*/(q|k|v|o|gate|up|down)_proj/kernel"  # kernels adapted by LoRA/MoRA (all seven projections)

    c.run = "full,lora_small,mora_small,lora_large,mora_large"  # which methods to run, in this order
    c.methods = ml_collections.ConfigDict()  # name -> method spec
    # Learning rates: LoRA and MoRA share one. 3e-3 was the best of a small sweep at r=8 on 64 pairs
    # (LoRA: 1e-3, 3e-3, 1e-2; MoRA: 3e-3, 1e-2, 3e-2, 1e-1; accuracy after 500 steps).
    c.methods.full = _method("full", lr=1e-3)
    c.methods.lora_small = _method("lora", r=1, lr=3e-3)
    c.methods.mora_small = _method("mora", r=1, mora_type=6, lr=3e-3)
    c.methods.lora_large = _method("lora", r=8, lr=3e-3)
    c.methods.mora_large = _method("mora", r=8, mora_type=1, lr=3e-3)

    if variant == "tiny":  # for tests: seconds, not minutes
        c.num_pairs = 8
        c.batch_size = 8
        c.eval_steps = (4, 8)
        c.model.hidden_size = 32
        c.model.intermediate_size = 64
        c.model.num_hidden_layers = 1
        c.model.num_attention_heads = 2
        c.model.num_key_value_heads = 2
        c.pretrain_steps = 4
        c.warmup_steps = 2
    elif variant == "paper":  # the paper's pairs and ranks on LLaMA-7B-wide layers, for accelerators
        c.model.hidden_size = 4096
        c.model.intermediate_size = 11008
        c.model.num_hidden_layers = 4
        c.model.num_attention_heads = 32
        c.model.num_key_value_heads = 32
        c.model.dtype = "bfloat16"
        c.num_pairs = 10000
        c.batch_size = 64
        c.pretrain_steps = 2000
        c.pretrain_lr = 3e-4
        c.methods.full.lr = 5e-5
        for name, r in (("lora_small", 8), ("mora_small", 8), ("lora_large", 256), ("mora_large", 256)):
            c.methods[name].r = r
            c.methods[name].alpha = 2.0 * r
            c.methods[name].lr = 2e-4
    elif variant:
        raise ValueError(f"unknown variant {variant!r}: use '', 'tiny' or 'paper'")
    return c
