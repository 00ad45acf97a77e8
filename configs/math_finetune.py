"""Math fine-tuning (MetaMathQA-style records), the reference's recipe (MoRA type 6: docs/mora.md).

    python -m train.finetune --config=configs/math_finetune.py --config.model.hf_path=/path/to/Llama-2-7b-hf \
        --config.data.source=MetaMathQA-395K.json --config.data.tokenizer=/path/to/Llama-2-7b-hf/tokenizer.model
    python -m train.finetune --config=configs/math_finetune.py:tiny   # seconds, generated data (tests)
    python -m train.finetune --config=configs/math_finetune.py:chat --config.model.hf_path=Llama-3.2-1B-Instruct \
        --config.data.source=train.jsonl --config.data.eval_source=test.jsonl   # chat template, accuracy

Recipe: r=8, type 6, all seven projections, lr 3e-4, batch 128, 3 epochs, cosine with 3% warm-up,
max length 512, dropout 0.05 on the adapter input.
"""

from configs.base import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.workdir = f"runs/math_finetune{'_' + variant if variant else ''}"
    c.method = "mora"
    c.model.hf_path = ""  # required: a LLaMA checkpoint (e.g. Llama-2-7b-hf)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.adapter.r = 8
    c.adapter.mora_type = 6
    c.adapter.dropout = 0.05
    c.optim.lr = 3e-4
    c.optim.decay = "cosine"
    c.optim.warmup_steps = 275  # 3% of 3 epochs of MetaMathQA-395K at batch 128 (9,257 steps)
    c.train.steps = 9257  # 3 epochs of 395k examples at batch 128
    c.train.batch_size = 128
    c.train.grad_accum = 4
    c.train.seq_len = 512
    c.data.format = "metamathqa"
    c.data.num_epochs = 3
    c.checkpoint.every = 500
    if variant == "tiny":
        c.model.hf_path = ""
        c.model.preset = "tiny"
        c.model.dtype = "float32"
        c.model.param_dtype = "float32"
        c.model.overrides.vocab_size = 512
        c.model.overrides.max_position_embeddings = 256  # prompt + generated answer (accuracy) fit
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 2
        c.train.steps = 12
        c.train.batch_size = 8
        c.train.grad_accum = 1
        c.train.seq_len = 192
        c.train.log_every = 4
        c.data.source = "data/math_train.jsonl"
        c.data.eval_source = "data/math_eval.jsonl"
        c.data.tokenizer = "data/tok.model"
        c.data.accuracy_source = c.data.get_ref("eval_source")  # exact-match accuracy beside the loss
        c.data.accuracy_examples = 8
        c.data.accuracy_max_new_tokens = 40
        c.data.num_epochs = None
        c.checkpoint.every = 4
        c.export.merged = True
    elif variant == "chat":
        # Instruction tuning of a chat checkpoint (e.g. Llama-3.2-1B-Instruct, Qwen2.5-0.5B-Instruct) on a
        # local JSONL file: the checkpoint's own tokenizer and chat template, exact-match accuracy on
        # data.eval_source beside the loss. Required: model.hf_path, data.source, data.eval_source.
        c.data.tokenizer = ""  # the checkpoint's tokenizer.json / tokenizer.model
        c.data.chat_template = True
        c.data.accuracy_source = c.data.get_ref("eval_source")
        c.data.accuracy_examples = 200
        c.train.eval_every = 500
    elif variant == "llama2_7b_tpu":
        # Llama-2-7B at 2048 tokens on a TPU v5e 2x4 slice (8 chips x 16 GiB), planned from a CPU machine:
        #   python -m train.plan --config=configs/math_finetune.py:llama2_7b_tpu --topology=v5e:2x4
        # (docs/tpu.md, "Planning a TPU run from a CPU machine"). The planner reads shapes only (this preset,
        # or model.hf_path's config.json); a run sets model.hf_path to the checkpoint.
        c.model.preset = "llama2-7b"
        c.model.scan_layers = True
        c.model.remat_policy = "full"
        c.train.seq_len = 2048
        c.train.batch_size = 32
        c.train.grad_accum = 1
        c.train.steps = 37028  # 3 epochs of MetaMathQA-395K at 32 rows (one example per row, unpacked)
        c.optim.warmup_steps = 1100  # 3% of the run
        c.mesh.data = 1
        c.mesh.fsdp = -1  # weights sharded over every chip
    elif variant in ("llama31_70b_tpu", "llama31_8b_tpu"):
        # A 70B (8B) model on one small TPU v5e slice, planned from a CPU machine (docs/tpu.md, "Quantized
        # bases"): 4,096 (2,048) tokens, batch 4, weights sharded over every chip, the loss chunk by chunk.
        #   python -m train.plan --config=configs/math_finetune.py:llama31_70b_tpu --topology=v5e:2x2
        # A run sets model.hf_path to the checkpoint; the planner reads the preset's shapes only.
        big = variant == "llama31_70b_tpu"
        c.model.preset = "llama3.1-70b" if big else "llama3.1-8b"
        c.model.scan_layers = True
        c.model.remat_policy = "full"
        c.train.seq_len = 4096 if big else 2048
        c.train.batch_size = 4
        c.train.grad_accum = 1
        c.train.loss_chunk = 512
        c.mesh.data = 1
        c.mesh.fsdp = -1
    elif variant:
        raise ValueError(f"unknown variant {variant!r}: use '', 'tiny', 'chat', 'llama2_7b_tpu', 'llama31_70b_tpu' "
                         "or 'llama31_8b_tpu'")
    return c
