"""Benchmark of the MoRA/ReLoRA 1B pretraining model (hidden 2048, 24 layers, vocabulary 32,100).

    python -m train.benchmark --config configs/bench_1b.py --out benchmarks/gpu_1b.json

Meant for an accelerator (bfloat16); on a CPU pass --config.model.dtype=float32
--config.model.param_dtype=float32 --config.train.batch_size=1 --config.train.seq_len=128 and expect
minutes per method.
"""

from configs.bench_tiny import bench_config


def get_config():
    c = bench_config()
    c.model.preset = "mora-1b"  # LLaMA 1B: hidden 2048, intermediate 5461, 24 layers, 32 heads
    c.model.dtype = c.model.param_dtype = "bfloat16"  # compute and frozen weights on accelerators; trainables stay float32
    c.model.scan_layers = True  # nn.scan over layers: compiles in seconds instead of minutes
    c.model.remat_policy = "dots_with_no_batch_dims_saveable"  # keep the matmul outputs, recompute the rest
    c.train.batch_size = 8  # sequences per step
    c.train.seq_len = 1024  # tokens per sequence (the paper's pretraining length)
    b = c.benchmark
    b.r_small = 8  # small rank
    b.r_large = 256  # large rank: the paper's pretraining rank for this model
    b.steps = 10  # timed steps per method
    b.warmup = 3  # untimed steps per method
    b.matmul_size = 8192  # large enough to saturate an accelerator's matrix units
    b.generation.prompt_len = 128  # prompt tokens per row
    b.scaling.seq_lens = (256, 512, 1024, 2048)  # tokens sweep
    b.scaling.batches = (1, 4, 8, 16)  # batch sweep
    b.scaling.ranks = (8, 32, 128, 256)  # rank sweep
    return c
