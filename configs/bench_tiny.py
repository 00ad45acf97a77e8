"""Benchmark of the test-sized LLaMA (seconds on a laptop CPU; the harness's smoke test).

    python -m train.benchmark --config configs/bench_tiny.py --out benchmarks/cpu_tiny.json
    python -m train.benchmark --config configs/bench_tiny.py --scaling --out benchmarks/scaling.json
    python -m train.benchmark --config configs/bench_tiny.py --config.steps=20 ...   # any field overridable
"""

import ml_collections


def bench_config():
    """Fields shared by every benchmark config (one comment per field)."""
    c = ml_collections.ConfigDict()
    c.model = "tiny"  # a mora_jax.models.llama.LLAMA_CONFIGS preset: "tiny", "mora-250m", "mora-1b", ...
    c.model_overrides = ml_collections.ConfigDict()  # other LlamaConfig fields (set in a config file)
    c.num_layers = 0  # override the preset's num_hidden_layers (0 = keep), e.g. a shallow 250M-wide model
    c.scan_layers = False  # nn.scan over layers (faster compiles of deep models; the loop's default is off)
    c.remat_policy = "none"  # activation checkpointing of the decoder layers ("none", "full", "dots_saveable", ...)
    c.batch = 4  # sequences per step (the same for every method)
    c.seq_len = 64  # tokens per sequence
    c.dtype = "float32"  # compute dtype of the model and of the peak-matmul measurement ("bfloat16" on accelerators)
    c.param_dtype = ""  # storage dtype of the frozen weights ("" = dtype); trainables are always float32
    c.r_small = 8  # the small LoRA rank (MoRA matches its trainable parameters: r̂ = round(sqrt((k+d)·r)))
    c.r_large = 32  # the large LoRA rank
    c.mora_types = (1, 6)  # MoRA operator types timed at each rank (1: large r, 6: small r, in the paper)
    c.steps = 5  # timed training steps per method (median reported), interleaved across methods
    c.warmup = 2  # untimed steps per method after compilation
    c.interleave = True  # time the methods round-robin, one step each, so background load hits all alike
    c.xla_tuning_ablation = True  # also time the small-rank adapter steps without mora_jax.xla_tuning's options (CPU)
    c.lr = 1e-4  # AdamW learning rate (constant; does not change the timings)
    c.seed = 0  # model init, adapters and the random token batch
    c.merge_type = 1  # MoRA type of the timed ReMoRA merge (the reference's cycle starts at type 1)
    c.merge_r = 0  # rank of the timed ReMoRA merge (0 = r_large, as in ReMoRA pretraining)
    c.matmul_size = 2048  # practical peak: chained size x size @ size x size matmuls, best run
    c.matmul_chain = 4  # matmuls chained in one jitted call
    c.matmul_repeats = 5  # runs of the chain (the best is the peak)

    c.delta_weight = ml_collections.ConfigDict()  # delta_weight vs writing an output of the same size
    c.delta_weight.enabled = True  # run the micro-benchmark
    c.delta_weight.in_features = 4096  # k of the kernel (LLaMA-7B's MLP: 4096 x 11008)
    c.delta_weight.out_features = 11008  # d of the kernel
    c.delta_weight.r = 8  # LoRA rank whose r̂ is used
    c.delta_weight.mora_types = (1, 6)  # operator types timed
    c.delta_weight.repeats = 5  # timed calls each (median)

    c.scaling = ml_collections.ConfigDict()  # --scaling: step time vs tokens and rank, merge vs kernel size
    c.scaling.seq_lens = (32, 64, 128)  # sequence lengths at batch = c.batch
    c.scaling.batches = (1, 2, 4, 8)  # batches at seq_len = c.seq_len
    c.scaling.ranks = (8, 16, 32, 64, 128, 256)  # LoRA/MoRA ranks at c.batch x c.seq_len (full as the reference)
    c.scaling.kernel_sizes = ((512, 512), (1024, 1024), (2048, 2048), (2048, 5632), (4096, 4096), (4096, 11008))  # k x d
    c.scaling.merge_r = 8  # rank of the delta_weight sweep
    c.scaling.steps = 5  # timed steps per point (median)
    c.scaling.warmup = 1  # untimed steps per point
    c.scaling.repeats = 5  # timed delta_weight calls per kernel size

    c.peer = ml_collections.ConfigDict()  # --peer: HF transformers + PEFT on the same CPU (pip install torch transformers peft)
    c.peer.steps = 5  # timed PyTorch steps per method (median)
    c.peer.threads = 0  # torch.set_num_threads (0 = all cores)
    return c


def get_config():
    return bench_config()
