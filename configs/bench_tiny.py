"""Benchmark of the test-sized LLaMA (seconds on a laptop CPU; the harness's smoke test).

    python -m train.benchmark --config configs/bench_tiny.py --out benchmarks/cpu_tiny.json
    python -m train.benchmark --config configs/bench_tiny.py --scaling --out benchmarks/scaling.json
    python -m train.benchmark --config configs/bench_tiny.py --config.benchmark.steps=20 ...   # any field overridable

A benchmark config is a run config (``configs/base.py``: the model, its dtypes, remat and scan, the
batch and sequence length, the optimizer, the mesh, the seed) plus one ``benchmark`` section for what
only the benchmark has (``mora_jax.bench.config``). The run's method and adapter are not used: each
timed method (full, LoRA and MoRA at ``benchmark.r_small`` / ``r_large``) replaces them.
"""

import ml_collections

from configs.base import base_config


def bench_config():
    """Fields shared by every benchmark config (one comment per benchmark field)."""
    c = base_config()
    c.workdir = ""  # unused: the benchmark writes --out
    c.model.preset = "tiny"  # a mora_jax.models.config.LLAMA_CONFIGS preset, or set model.hf_path
    c.train.batch_size = 4  # sequences per step (the same for every method)
    c.train.seq_len = 64  # tokens per sequence
    c.optim.lr = 1e-4  # AdamW learning rate
    c.optim.warmup_steps = 0
    c.optim.decay = "constant"
    c.checkpoint.every = 0

    b = c.benchmark = ml_collections.ConfigDict()
    b.r_small = 8  # the small LoRA rank (MoRA matches its trainable parameters: r̂ = round(sqrt((k+d)·r)))
    b.r_large = 32  # the large LoRA rank
    b.mora_types = (1, 6)  # MoRA operator types timed at each rank (1: large r, 6: small r, in the paper; () = none)
    b.peft_methods = ()  # PEFT-family methods also timed at r_small, of "dora", "pissa", "hira" (goals vs LoRA in the targets)
    b.full = True  # also time full fine-tuning of the seven projections (the reference of the "vs full" ratios)
    b.steps = 5  # timed training steps per method (median reported), interleaved across methods
    b.warmup = 2  # untimed steps per method after compilation
    b.interleave = True  # time the methods round-robin, one step each, so background load hits all alike
    b.xla_tuning_ablation = True  # also time the small-rank adapter steps without mora_jax.xla_tuning's options (CPU)
    b.merge_type = 1  # MoRA type of the timed ReMoRA merge (the reference's cycle starts at type 1)
    b.merge_r = 0  # rank of the timed ReMoRA merge (0 = r_large, as in ReMoRA pretraining)
    b.matmul_size = 2048  # practical peak: chained size x size @ size x size matmuls, best run
    b.matmul_chain = 4  # matmuls chained in one call
    b.matmul_repeats = 5  # runs of the chain before the benchmark (the best is the peak; it also runs once per round)

    b.delta_weight = ml_collections.ConfigDict()  # delta_weight vs writing an output of the same size
    b.delta_weight.enabled = True  # run the micro-benchmark
    b.delta_weight.in_features = 4096  # k of the kernel (LLaMA-7B's MLP: 4096 x 11008)
    b.delta_weight.out_features = 11008  # d of the kernel
    b.delta_weight.r = 8  # LoRA rank whose r̂ is used
    b.delta_weight.mora_types = (1, 6)  # operator types timed
    b.delta_weight.repeats = 5  # timed calls each (median)

    b.scaling = ml_collections.ConfigDict()  # --scaling: step time vs tokens and rank, merge vs kernel size
    b.scaling.seq_lens = (32, 64, 128)  # sequence lengths at batch = train.batch_size
    b.scaling.batches = (1, 2, 4, 8)  # batches at seq_len = train.seq_len
    b.scaling.ranks = (8, 16, 32, 64, 128, 256)  # LoRA/MoRA ranks at the run's batch (full as the reference)
    b.scaling.kernel_sizes = ((512, 512), (1024, 1024), (2048, 2048), (2048, 5632), (4096, 4096), (4096, 11008))  # k x d
    b.scaling.merge_r = 8  # rank of the delta_weight sweep
    b.scaling.steps = 5  # timed steps per point (median)
    b.scaling.warmup = 1  # untimed steps per point
    b.scaling.repeats = 5  # timed delta_weight calls per kernel size

    b.peer = ml_collections.ConfigDict()  # --peer: HF transformers + PEFT on the same CPU (pip install torch transformers peft)
    b.peer.threads = 0  # torch.set_num_threads (0 = all cores)
    b.peer.attention = "sdpa"  # transformers' attention: "sdpa" (its default) or "eager"
    b.peer.generation = True  # with --peer, also time generation in both frameworks (benchmark.generation)

    b.generation = ml_collections.ConfigDict()  # --generation (and --peer's generation comparison)
    b.generation.batches = (1, 8)  # prompts per call (--generation_batches overrides)
    b.generation.prompt_len = 64  # prompt tokens per row (--generation_prompt_len)
    b.generation.new_tokens = 32  # tokens generated per row (--generation_new_tokens)
    b.generation.repeats = 3  # timed calls per program, median (--generation_repeats)
    b.generation.warmup = 1  # untimed calls per program after compiling
    b.generation.flops_long = 0  # the long prefix of the FLOPs comparison (0 = max_position_embeddings)
    return c


def get_config():
    return bench_config()
