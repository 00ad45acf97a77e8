"""Benchmark of the MoRA/ReLoRA 1B pretraining model (hidden 2048, 24 layers, vocabulary 32,100).

    python -m train.benchmark --config configs/bench_1b.py --out benchmarks/gpu_1b.json

Meant for an accelerator (bfloat16); on a CPU pass --config.dtype=float32 --config.batch=1
--config.seq_len=128 and expect minutes per method.
"""

from configs.bench_tiny import bench_config


def get_config():
    c = bench_config()
    c.model = "mora-1b"  # LLaMA 1B: hidden 2048, intermediate 5461, 24 layers, 32 heads
    c.batch = 8  # sequences per step
    c.seq_len = 1024  # tokens per sequence (the paper's pretraining length)
    c.dtype = "bfloat16"  # compute and frozen-weight dtype on accelerators; trainables stay float32
    c.r_small = 8  # small rank
    c.r_large = 256  # large rank: the paper's pretraining rank for this model
    c.steps = 10  # timed steps per method
    c.warmup = 3  # untimed steps per method
    c.scan_layers = True  # nn.scan over layers: compiles in seconds instead of minutes
    c.remat_policy = "dots_with_no_batch_dims_saveable"  # keep the matmul outputs, recompute the rest
    c.matmul_size = 8192  # large enough to saturate an accelerator's matrix units
    c.scaling.seq_lens = (256, 512, 1024, 2048)  # tokens sweep
    c.scaling.batches = (1, 4, 8, 16)  # batch sweep
    c.scaling.ranks = (8, 32, 128, 256)  # rank sweep
    return c
