"""Benchmark of the MoRA/ReLoRA 250M pretraining model (hidden 768, 24 layers, vocabulary 32,100).

    nice -n 10 python -m train.benchmark --config configs/bench_250m.py --out benchmarks/cpu_250m.json

Sized for two CPU cores (a few minutes in float32); on an accelerator raise batch/seq_len and use
--config.dtype=bfloat16.
"""

from configs.bench_tiny import bench_config


def get_config():
    c = bench_config()
    c.model = "mora-250m"  # LLaMA 250M: hidden 768, intermediate 2560, 24 layers, 16 heads
    c.batch = 1  # sequences per step (small: two CPU cores)
    c.seq_len = 256  # tokens per sequence
    c.dtype = "float32"  # CPUs have no fast bfloat16 matmul
    c.r_small = 8  # small rank
    c.r_large = 128  # large rank: the paper's pretraining rank for this model
    c.steps = 3  # timed steps per method (each ~1-5 s on two cores)
    c.warmup = 1  # untimed steps per method
    c.scan_layers = False  # unrolled like the training loop's default
    c.scaling.seq_lens = (128, 256, 512)  # tokens sweep at batch 1
    c.scaling.batches = (1, 2, 4)  # batch sweep at seq_len 256
    c.scaling.ranks = (8, 32, 128, 256)  # rank sweep
    c.scaling.steps = 2  # timed steps per point
    return c
