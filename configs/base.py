"""Fields shared by the pretraining and fine-tuning configs (one comment per field).

Each section maps onto the dataclass of the same name in ``mora_jax.run_config`` (same field
names); ``RunConfig.from_dict`` checks them. The schedule's length is ``train.steps`` and its restart
period ``remora.every``: neither is set twice.
"""

import ml_collections

from mora_jax.methods import LLAMA_TARGETS


def base_config():
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds model init (presets), adapters, dropout and data shuffling
    c.workdir = "runs/default"  # metrics.jsonl, tensorboard/, loss_curve.png, run_config.json, checkpoints/, export/
    c.method = "mora"  # "mora", "lora", "dora", "pissa", "hira" or "full" (full fine-tuning of adapter.targets + adapter.unfreeze)

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # a mora_jax.models.llama.LLAMA_CONFIGS name, used when hf_path is empty
    c.model.hf_path = ""  # a Hugging Face LLaMA directory to start from (config.json + *.safetensors)
    c.model.dtype = "float32"  # compute dtype ("bfloat16" on accelerators)
    c.model.param_dtype = "float32"  # storage dtype of the frozen weights (trainables are always float32)
    c.model.remat_policy = "none"  # activation checkpointing: "none", "full", "projections", "dots_saveable", ...
    c.model.scan_layers = False  # nn.scan over layers (faster compiles for deep models)
    c.model.attention = "auto"  # "auto" (TPU: Pallas flash kernel, GPU: cuDNN, CPU: einsum), "xla", "flash", "cudnn"
    # other LlamaConfig fields for a preset; these three can be set from the command line
    # (--config.model.overrides.num_hidden_layers=4), a config file may add any other
    c.model.overrides = ml_collections.ConfigDict({
        name: ml_collections.FieldReference(None, field_type=int)
        for name in ("num_hidden_layers", "vocab_size", "max_position_embeddings")})
    # QMoRA: the frozen kernels stored quantized, dequantized matmul by matmul in the step (docs/quantization.md)
    c.model.quantize = ml_collections.ConfigDict()
    c.model.quantize.format = "none"  # "none", "int8" (per output channel), "int4", "nf4", "gguf" (a GGUF file's blocks), "q8_0", "q4_0", "q4_1"
    c.model.quantize.block_size = 64  # int4 / nf4: input features per scale (must divide them); GGUF formats: 32
    c.model.quantize.scale_dtype = "float32"  # "float32" or "bfloat16" scales (GGUF keeps its float16 ones)
    c.model.quantize.targets = LLAMA_TARGETS  # one regex over parameter paths: the seven projections, not embeddings/norms/lm_head
    # a ReMoRA / ReLoRA merge into a quantized kernel: "residual" keeps the update exactly beside the codes (LoRA,
    # MoRA without a magnitude), "requantize" quantizes the merged kernel again, "auto" residual on 4-bit formats
    c.model.quantize.merge = "auto"

    c.adapter = ml_collections.ConfigDict()
    c.adapter.r = 8  # LoRA rank; MoRA uses r̂ = round(sqrt((k+d)·r)) (same trainable count)
    c.adapter.mora_type = 6  # MoRA operators: 1 (large r) or 6 (small r); 2/3/4 appear in ReMoRA cycles
    c.adapter.alpha = 16.0  # LoRA only: scale alpha/r
    c.adapter.rslora = False  # LoRA only: scale alpha/sqrt(r)
    c.adapter.dropout = 0.0  # dropout on the adapter input
    c.adapter.magnitude = False  # MoRA only: a DoRA-style trainable magnitude per output feature (needs export.adapter=False)
    c.adapter.targets = LLAMA_TARGETS  # comma-separated regexes of kernels to adapt (all seven projections)
    c.adapter.unfreeze = ""  # comma-separated regexes of base params trained in full
    # PiSSA only: None = exact SVD of each kernel; n = randomized SVD with n subspace iterations
    c.adapter.niter = ml_collections.FieldReference(None, field_type=int)

    c.remora = ml_collections.ConfigDict()
    c.remora.every = 0  # ReMoRA/ReLoRA: merge into the weights every T steps (0 = never)
    c.remora.type_cycle = (1, 2, 3, 4)  # MoRA types used in turn after each merge (reference default)
    c.remora.reset_optimizer = True  # fresh optimizer state for the adapters at each merge
    c.remora.diagnostics = True  # log per merge: ‖ΔW‖ per layer type, rank of the change since the start

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # any optax optimizer by name ("adamw", "lion", "sgd", ...)
    c.optim.kwargs = ml_collections.ConfigDict()  # its arguments besides the lr, for optimizers other than adamw
    c.optim.lr = 3e-4  # peak learning rate
    c.optim.warmup_steps = 100  # linear warm-up from 0
    c.optim.decay = "cosine"  # "cosine", "linear" or "constant"
    c.optim.min_lr_ratio = 0.0  # decay floor as a fraction of lr
    c.optim.restart_warmup = 50  # ReMoRA: re-warm-up steps after each merge
    c.optim.restart_flavour = "reference"  # "reference" (new schedule from the lr at the merge) or "cosine_restarts"
    c.optim.weight_decay = 0.0  # AdamW decoupled weight decay
    c.optim.b1 = 0.9  # AdamW beta1
    c.optim.b2 = 0.999  # AdamW beta2
    c.optim.eps = 1e-8  # AdamW epsilon
    c.optim.clip_norm = 1.0  # global gradient-norm clipping (0 = off)
    c.optim.lr_in_state = False  # peak lr as an array in the optimizer state: runs differing in lr share one program

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000  # optimizer steps
    c.train.batch_size = 8  # global batch in sequences (split over processes and micro-batches)
    c.train.grad_accum = 1  # micro-batches per optimizer step
    c.train.seq_len = 512  # tokens per sequence
    c.train.log_every = 10  # steps between metric lines
    c.train.eval_every = 0  # steps between evaluations (0 = only at the end)
    c.train.eval_batches = 20  # batches per evaluation (0 = the whole eval split)
    c.train.progress = True  # progress bar
    c.train.z_loss = 0.0  # z-loss coefficient on the log-partition (0 = off)
    c.train.loss_chunk = 0  # loss over this many positions at a time, no full float32 logits (0 = off)
    # A run can collapse and stay finite (mora_jax.health): these say what counts as unhealthy. While
    # it is, the last checkpoint from before is kept out of checkpoint.keep's rotation and named.
    c.train.collapse_steps = 5  # steps in a row with a zero gradient norm or a loss pinned at ln(vocab) (0 = off)
    c.train.on_collapse = "stop"  # a collapse "stop"s the run (naming the checkpoint to resume from) or "warn"s
    c.train.spike_window = 100  # a loss spike is judged against this many recent healthy losses (0 = off)
    c.train.spike_zscore = 6.0  # robust z-score (median, MAD; spread >= 0.1 nat) that 3 losses in a row must pass

    c.data = ml_collections.ConfigDict()
    c.data.source = ""  # "c4", or local .txt/.jsonl/.parquet files (a path or glob)
    c.data.eval_source = ""  # held-out split for evaluation (same kinds); empty = no evaluation
    c.data.tokenizer = ""  # SentencePiece .model, tokenizer.json or checkpoint dir; empty = model.hf_path's
    c.data.chat_template = False  # fine-tuning: prompt as a user turn of the tokenizer's chat template
    c.data.accuracy_source = ""  # fine-tuning: held-out records scored by exact-match answer accuracy ("" = off)
    c.data.accuracy_examples = 0  # how many of them to score (0 = all)
    c.data.accuracy_max_new_tokens = 256  # generation budget per answer
    c.data.text_field = "text"  # field holding the text in JSON/Parquet records
    c.data.overlong = "truncate"  # what to do with too long documents/examples: "truncate" or "drop"
    c.data.format = "alpaca"  # fine-tuning records: "alpaca" (instruction/input/output) or "metamathqa" (query/response)
    c.data.prompt_template = ""  # fine-tuning: prompt template over the record's fields ("" = the format's own)
    c.data.packing = False  # fine-tuning: pack several examples per row (attention stays within each)
    c.data.num_epochs = ml_collections.FieldReference(None, field_type=int)  # passes over the data (None = forever)
    c.data.eval_split = "train"  # the split of a Hub data set used for evaluation
    c.data.on_bad_record = "error"  # record without its fields, non-UTF-8/JSON line: "error" (names file, line) or "skip"

    c.mesh = ml_collections.ConfigDict()
    # mesh axes, in order (the keys are the axis names; one size may be -1 = the remaining devices)
    c.mesh.data = -1  # data-parallel axis size (-1 = the rest of the devices)
    c.mesh.fsdp = 1  # parameter-sharded data-parallel axis size
    c.mesh.tensor = 1  # tensor-parallel axis size

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500  # steps between orbax checkpoints (0 = none)
    c.checkpoint.keep = 3  # checkpoints kept
    c.checkpoint.async_save = True  # save in the background
    c.checkpoint.mode = "resume"  # "resume" an existing run in workdir, "new" (refuse if one exists), "overwrite"

    c.export = ml_collections.ConfigDict()
    c.export.adapter = True  # write export/adapter in PEFT format (the reference's MoRA fork reads it)
    c.export.merged = False  # write export/merged as a Hugging Face checkpoint
    return c
