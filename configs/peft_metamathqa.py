"""Hugging Face PEFT's method-comparison protocol: fine-tune Llama-3.2-3B on MetaMathQA, score GSM8K
exact-match accuracy (docs/finetuning.md, "Hugging Face PEFT's MetaMathQA protocol").

    python -m train.prepare_metamathqa --metamathqa MetaMathQA-395K.json \\
        --gsm8k-train gsm8k/main/train-00000-of-00001.parquet --gsm8k-test gsm8k/main/test-00000-of-00001.parquet \\
        --out data/peft                                   # PEFT's filter and splits, as query/response JSON lines
    python -m train.finetune --config=configs/peft_metamathqa.py --config.model.hf_path=/path/to/Llama-3.2-3B
    python -m train.finetune --config=configs/peft_metamathqa.py:dora --config.model.hf_path=...   # another method
    python -m train.finetune --config=configs/peft_metamathqa.py:tiny     # seconds, generated data, tiny model
    python -m train.plan --config=configs/peft_metamathqa.py:tpu --topology=v5e:2x2 --compare=mora,dora,pissa --steps=train
    python -m train.plan --config=configs/peft_metamathqa.py:tpu,full --topology=v5e:2x2 --steps=train   # own targets, remat

The variant is ``[SIZE][,METHOD]``: SIZE is '' (the protocol on the real checkpoint), 'tiny' (runs on a
CPU: generated records, a tiny model) or 'tpu' (the '' run with the public preset's shapes, scanned
layers, weights sharded over the slice: what train.plan compiles); METHOD is one of
mora_jax.methods.METHODS ('mora', 'lora', 'dora', 'pissa', 'full') or 'mora1' / 'mora6' (MoRA with
that type) and sets the method with PEFT's learning rate for it. ``--config.method=NAME`` works too
and keeps the learning rate of the variant (PEFT's 1e-4; full fine-tuning used 1e-5).

Sources, Hugging Face PEFT (github.com/huggingface/peft), folder method_comparison/MetaMathQA/:
  [D] default_training_params.json @ 41921013f57a3815cf6a25cf01e6ffbdd89c1292 (every run's defaults)
  [L] experiments/lora/llama-3.2-3B-rank32/adapter_config.json @ d998b352d9ace44116752998bbf71a1a1206b777
  [O] experiments/lora/llama-3.2-3B-rank32-dora/adapter_config.json @ f8bbafe062f9abd1cf9d91559c07bdb454ab6e40
  [F] experiments/full-finetuning/llama-3.2-3B-lr_0.00001/training_params.json @ 30072d5bed218e394edd2bc2a93643feffe89788
  [H] experiments/hira/llama-3.2-3B-rank32-lr4.5e-3/training_params.json @ 7d775f64b8d3a4479caa7d33f04c650562e84614
      (lr 4.5e-3, weight decay 0) and its adapter_config.json @ 5fbf730d (r=32, q_proj and v_proj, dropout 0)
  [U] utils.py @ 013424400cdc3ac2bf6cdf5555d83d8808ffe153 (AdamW from torch.optim, WARMUP_STEP_RATIO,
      get_cosine_schedule_with_warmup, parse_answer / get_accuracy)
  [R] run.py @ 026d1e0164165fcb4a2a98cd9b37af619745d8b3 (training loop, validation every eval_steps, test at the end)
  [A] data.py @ d9e56aa757fd6e822a5a73fe5c8b8dcee72bb682 (CHAR_LIMIT, VALID_SIZE, GSM8K splits, prompt + response)
  [P] peft 0.21.2 peft/utils/constants.py: a LoRA config without target_modules adapts llama's q_proj, v_proj
Where this project differs from PEFT's loop: docs/finetuning.md lists it (loss on response tokens only,
no length bucketing, the GSM8K validation curve).
"""

from configs.base import base_config
from mora_jax.methods import METHODS

PEFT_TEMPLATE = "Question: {query} Think step by step.\nAnswer:"  # [D] query_template; [A] appends the response
PEFT_TARGETS = r".*/(q|v)_proj/kernel"  # [L] target_modules null -> [P] q_proj, v_proj
PEFT_LR = {"full": 1e-5, "hira": 4.5e-3}  # [F], [H]; every other method: [D] optimizer_kwargs.lr = 1e-4
PEFT_WEIGHT_DECAY = {"hira": 0.0}  # [H]; every other method: [D] optimizer_kwargs.weight_decay = 0.1
SIZES = ("", "tiny", "tpu")
METHOD_VARIANTS = (*METHODS, "mora1", "mora6")


def get_config(variant: str = ""):
    size, _, method = variant.partition(",")
    if size in METHOD_VARIANTS and not method:
        size, method = "", size
    if size not in SIZES or (method and method not in METHOD_VARIANTS):
        raise ValueError(f"unknown variant {variant!r}: use [SIZE][,METHOD], SIZE one of {SIZES}, "
                         f"METHOD one of {METHOD_VARIANTS}")
    c = base_config()
    c.workdir = f"runs/peft_metamathqa{'_' + variant.replace(',', '_') if variant else ''}"  # metrics, checkpoints, export
    c.seed = 0  # [D] seed
    c.method = "lora"  # [L] PEFT's reference experiment (LoRA r=32); any METHODS name
    c.model.hf_path = ""  # required: meta-llama/Llama-3.2-3B downloaded ([D] model_id)
    c.model.dtype = "bfloat16"  # [D] dtype: bf16 weights and compute, no autocast ([D] use_amp false)
    c.model.param_dtype = "bfloat16"  # [D] dtype: the frozen base weights in bf16
    c.model.remat_policy = "none"  # [D] has no gradient checkpointing (use_gc absent = off)
    c.adapter.r = 32  # [L] r; MoRA's square matrix gets LoRA r=32's trainable count
    c.adapter.alpha = 64.0  # [L] lora_alpha (scale 2)
    c.adapter.rslora = False  # [L] use_rslora
    c.adapter.dropout = 0.0  # [L] lora_dropout
    c.adapter.targets = PEFT_TARGETS  # [L] + [P]: q_proj and v_proj of every layer
    c.adapter.mora_type = 6  # MoRA at r=32: type 6 (rotation) as the MoRA paper uses for small r
    c.optim.name = "adamw"  # [U] optimizer_type default "AdamW" (torch.optim.AdamW)
    c.optim.lr = 1e-4  # [D] optimizer_kwargs.lr
    c.optim.weight_decay = 0.1  # [D] optimizer_kwargs.weight_decay
    c.optim.b1 = 0.9  # torch.optim.AdamW default betas (0.9, 0.999)
    c.optim.b2 = 0.999  # torch.optim.AdamW default
    c.optim.eps = 1e-8  # torch.optim.AdamW default
    c.optim.decay = "cosine"  # [D] lr_scheduler "cosine" ([U] get_cosine_schedule_with_warmup, to 0)
    c.optim.min_lr_ratio = 0.0  # [U] the cosine ends at 0
    c.optim.warmup_steps = 500  # [U] WARMUP_STEP_RATIO 0.1 x [D] max_steps 5000
    c.optim.clip_norm = 1.0  # [D] grad_norm_clip
    c.train.steps = 5000  # [D] max_steps
    c.train.batch_size = 4  # [D] batch_size
    c.train.grad_accum = 1  # [D] one batch per optimizer step
    c.train.seq_len = 768  # [D] max_seq_length (PEFT truncates prompt + response to it)
    c.train.log_every = 25  # steps between metric lines
    c.train.eval_every = 0  # accuracy at the end: [R] scores the GSM8K test set once, after training
    c.data.format = "metamathqa"  # [A] MetaMathQA records: query, response
    c.data.prompt_template = PEFT_TEMPLATE  # [D] query_template, the response right after it ([A])
    c.data.source = "data/peft/metamathqa_train.jsonl"  # [A] all of MetaMathQA with len(query + response) <= 1300 chars
    c.data.eval_source = ""  # [R] has no held-out loss
    c.data.accuracy_source = "data/peft/gsm8k_test.jsonl"  # [A] ds_test: the whole GSM8K test split (1,319)
    c.data.accuracy_examples = 0  # [R] every test record
    c.data.accuracy_max_new_tokens = 300  # [D] generation_kwargs max_new_tokens (max_length 800 never binds first)
    c.data.overlong = "truncate"  # [A] truncates to max_seq_length
    c.data.num_epochs = None  # 5,000 x 4 = 20,000 of ~370k records: less than one epoch
    c.checkpoint.every = 1000  # steps between checkpoints
    c.export.adapter = True  # export/adapter in PEFT format
    if size == "tiny":
        c.model.hf_path = ""  # a tiny random model from the preset
        c.model.preset = "tiny"  # 2 layers, hidden 64
        c.model.dtype = "float32"  # CPUs: float32
        c.model.param_dtype = "float32"  # CPUs: float32
        c.model.overrides.vocab_size = 512  # the tokenizer trained on generated text
        c.model.overrides.max_position_embeddings = 256  # prompt + generated answer fit
        c.adapter.r = 8  # a rank the tiny kernels (64 wide) allow
        c.optim.lr = 3e-3  # a tiny random model learns in a few steps only with a large rate
        c.optim.warmup_steps = 1  # 10% of the steps, as [U]
        c.train.steps = 8  # seconds on a CPU
        c.train.batch_size = 8  # splits over the 8 CPU devices the tests use (XLA_FLAGS)
        c.train.seq_len = 128  # a generated record is about 60 tokens under the template
        c.train.log_every = 4  # two metric lines
        c.train.progress = False  # quiet
        c.data.source = "data/math_train.jsonl"  # python -m train.make_corpus --kind math (see docs/finetuning.md)
        c.data.accuracy_source = "data/math_eval.jsonl"  # generated held-out records
        c.data.tokenizer = "data/tok.model"  # python -m train.train_tokenizer (docs/finetuning.md)
        c.data.accuracy_examples = 8  # a few generations
        c.data.accuracy_max_new_tokens = 24  # enough for "... The answer is: N"
        c.checkpoint.every = 0  # no checkpoints
        c.export.adapter = False  # nothing to export
    elif size == "tpu":
        # The protocol's run with Llama-3.2-3B's public shapes (the planner reads shapes only; a run sets
        # model.hf_path). PEFT's batch of 4 leaves most of a slice idle: train.plan shows the cost per step.
        c.model.preset = "llama3.2-3b"  # mora_jax.models.LLAMA_CONFIGS: the public config.json's shapes
        c.model.scan_layers = True  # one compiled layer body: fast compiles of 28 layers
        c.mesh.data = 1  # the batch of 4 is not split over 8 chips
        c.mesh.fsdp = -1  # weights and optimizer state sharded over every chip
    if method:
        c.method = method.rstrip("16") if method in ("mora1", "mora6") else method
        if method in ("mora1", "mora6"):
            c.adapter.mora_type = int(method[-1])  # 1: sharing (large r), 6: rotation (small r)
        if method == "full":
            c.adapter.targets = ".*"  # [F] full fine-tuning trains every parameter (embeddings and norms too)
            if size == "tpu":
                c.model.remat_policy = "full"  # train.plan: 17.0 GiB per chip without remat, over a v5e chip's 16
        if size != "tiny":
            c.optim.lr = PEFT_LR.get(c.method, c.optim.lr)  # [F] 1e-5 for full fine-tuning, [H] 4.5e-3 for HiRA
        c.optim.weight_decay = PEFT_WEIGHT_DECAY.get(c.method, c.optim.weight_decay)  # [H] none for HiRA
    return c
