"""Benchmark of the MoRA/ReLoRA 250M pretraining model (hidden 768, 24 layers, vocabulary 32,100).

    nice -n 10 python -m train.benchmark --config configs/bench_250m.py --out benchmarks/cpu_250m.json

Sized for two CPU cores (a few minutes in float32); on an accelerator raise the batch/seq_len and use
--config.model.dtype=bfloat16 --config.model.param_dtype=bfloat16.
"""

from configs.bench_tiny import bench_config


def get_config():
    c = bench_config()
    c.model.preset = "mora-250m"  # LLaMA 250M: hidden 768, intermediate 2560, 24 layers, 16 heads
    c.model.dtype = c.model.param_dtype = "float32"  # CPUs have no fast bfloat16 matmul
    c.model.scan_layers = False  # unrolled like the training loop's default
    c.train.batch_size = 1  # sequences per step (small: two CPU cores)
    c.train.seq_len = 256  # tokens per sequence
    b = c.benchmark
    b.r_small = 8  # small rank
    b.r_large = 128  # large rank: the paper's pretraining rank for this model
    b.steps = 3  # timed steps per method (each ~1-5 s on two cores)
    b.warmup = 1  # untimed steps per method
    b.generation.prompt_len = 128  # prompt tokens per row
    b.scaling.seq_lens = (128, 256, 512)  # tokens sweep at batch 1
    b.scaling.batches = (1, 2, 4)  # batch sweep at seq_len 256
    b.scaling.ranks = (8, 32, 128, 256)  # rank sweep
    b.scaling.steps = 2  # timed steps per point
    return c
