"""C4 pretraining from scratch, the reference's recipe (MoRA with ReMoRA merges: docs/mora.md).

    python -m train.pretrain --config=configs/c4_pretrain.py:250m     # or :1b, :tiny
    python -m train.pretrain --config=configs/c4_pretrain.py:tiny --config.data.source=data/corpus.txt \
        --config.data.tokenizer=data/tok.model                          # offline, on a local corpus

Recipe: r=128, all seven projections adapted, embeddings + LM head + all norms trained in full,
ReMoRA merges every 2,000 steps (types 1→2→3→4), lr 5e-4, 1,000 warm-up steps, cosine, 10,000
steps, batch 1,024 sequences of 1,024 tokens, T5's 32,100-token vocabulary.
"""

from configs.base import base_config
from mora_jax.methods import LLAMA_FULLY_TRAINED


def get_config(variant: str = "250m"):
    c = base_config()
    c.workdir = f"runs/c4_pretrain_{variant or '250m'}"
    c.method = "mora"
    c.model.preset = {"250m": "mora-250m", "1b": "mora-1b", "250m_tpu": "mora-250m", "1b_tpu": "mora-1b",
                      "tiny": "tiny"}.get(variant or "250m", variant)
    c.model.dtype = "bfloat16"
    c.adapter.r = 128
    c.adapter.mora_type = 1
    c.adapter.unfreeze = ",".join(LLAMA_FULLY_TRAINED)
    c.remora.every = 2000
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 1000
    c.optim.decay = "cosine"
    c.optim.min_lr_ratio = 0.1
    c.train.steps = 10000
    c.train.batch_size = 1024
    c.train.grad_accum = 8
    c.train.seq_len = 1024
    c.train.eval_every = 1000
    c.data.source = "c4"
    c.data.eval_source = ""  # e.g. a local C4 validation shard
    c.data.tokenizer = "t5-tokenizer/spiece.model"  # T5's 32,100-token SentencePiece model (download it yourself)
    c.mesh.fsdp = -1
    c.mesh.data = 1
    c.checkpoint.every = 1000
    c.export.merged = True
    if variant == "tiny":  # seconds on a CPU: for tests and the offline walk-through
        c.model.dtype = "float32"
        c.model.overrides.vocab_size = 512
        c.adapter.r = 8
        c.remora.every = 10
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 5
        c.optim.restart_warmup = 2
        c.train.steps = 30
        c.train.batch_size = 8
        c.train.grad_accum = 1  # batch 8 splits over up to 8 data-parallel devices (the test suite's)
        c.train.seq_len = 64
        c.train.eval_every = 10
        c.train.eval_batches = 2
        c.train.log_every = 5
        c.data.source = "data/corpus.txt"
        c.data.eval_source = "data/corpus_eval.txt"
        c.data.tokenizer = "data/tok.model"
        c.mesh.fsdp = 1
        c.mesh.data = -1
        c.checkpoint.every = 5
    elif variant == "cpu":  # the pretraining comparison on real prose, minutes per method on 2 CPU cores
        c.workdir = "runs/compare_pretraining_cpu"
        c.model.preset = "tiny"  # widened below
        c.model.dtype = "float32"
        c.model.overrides.vocab_size = 2048  # the prose tokenizer's vocabulary
        c.model.overrides.hidden_size = 128
        c.model.overrides.intermediate_size = 344
        c.model.overrides.num_hidden_layers = 4
        c.model.overrides.num_attention_heads = 4
        c.model.overrides.num_key_value_heads = 4
        c.model.overrides.max_position_embeddings = 128
        c.adapter.r = 16  # 1/8 of the width, as r=128 is 1/6 of the 250M model's 768
        c.remora.every = 50  # 4 merge periods in the run (types 1, 2, 3, 4)
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 30
        c.optim.restart_warmup = 5
        c.train.steps = 200
        c.train.batch_size = 16
        c.train.grad_accum = 1
        c.train.seq_len = 128
        c.train.eval_every = 25
        c.train.eval_batches = 4
        c.train.log_every = 25
        c.data.source = "data/pyprose/train.txt"  # python -m train.make_corpus --from-rst ... (docs/experiments.md)
        c.data.eval_source = "data/pyprose/eval.txt"
        c.data.tokenizer = "data/pyprose/tok.model"
        c.mesh.fsdp = 1
        c.mesh.data = -1
        c.checkpoint.every = 50
        c.export.merged = False
    elif variant in ("250m_tpu", "1b_tpu"):
        # The reference's recipe at its batch (1,024 x 1,024 tokens) on a TPU slice, planned from a CPU
        # machine: python -m train.plan --config=configs/c4_pretrain.py:1b_tpu --topology=v4:2x2x2
        # (250m_tpu: --topology=v5e:2x4). docs/tpu.md, "Planning a TPU run from a CPU machine".
        c.model.scan_layers = True
        # keep each projection's output (adapter included), recompute the rest: on a v5e 2x4 it cut
        # MoRA 9.0 -> 7.9 and LoRA 10.7 -> 7.4 GiB per chip against "dots_saveable" (every matmul output)
        c.model.remat_policy = "projections"
        c.train.grad_accum = 16  # 64 rows per micro-batch: 8 per chip on 8 chips
        c.mesh.data = 1
        c.mesh.fsdp = -1  # weights, gradients and optimizer state sharded over every chip
    elif variant not in ("", "250m", "1b"):
        raise ValueError(f"unknown variant {variant!r}: use 250m, 1b, tiny, cpu, 250m_tpu or 1b_tpu")
    return c
