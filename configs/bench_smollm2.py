"""Benchmark of SmolLM2-135M's shape (LlamaForCausalLM: hidden 576, intermediate 1536, 30 layers, 9 query
and 3 key-value heads of 64, vocabulary 49,152, tied embeddings, rope theta 100,000), sized for two CPU cores.

    nice -n 10 python -m train.benchmark --config configs/bench_smollm2.py --peer --out benchmarks/cpu_smollm2.json
    nice -n 10 python -m train.benchmark --config configs/bench_smollm2.py --peer --config.benchmark.full=True \
        --config.benchmark.mora_types="()" --out benchmarks/cpu_smollm2_full.json    # full fine-tuning and LoRA
    python -m train.benchmark --config configs/bench_smollm2.py --config.model.hf_path=/path/to/SmolLM2-135M-Instruct ...

The preset ``smollm2-135m`` is initialised at random (the timings do not depend on the values); with
``model.hf_path`` the shape comes from the checkpoint's config.json and its weights are loaded (0.5 GB
of float32 safetensors: a few seconds). Batch 8 x 64 tokens is the fine-tuning shape of the issue
that logged 18-30 tokens/s, in float32.
"""

from configs.bench_tiny import bench_config


def get_config():
    c = bench_config()
    c.model.preset = "smollm2-135m"
    c.model.dtype = c.model.param_dtype = "float32"  # CPUs: float32 (bfloat16 was no faster here and compiles slower)
    c.train.batch_size = 8  # sequences per step
    c.train.seq_len = 64  # tokens per sequence
    b = c.benchmark
    b.r_small = 8  # the usual fine-tuning rank
    b.r_large = 8  # one rank: every method of both frameworks is held in memory at once
    b.full = False  # full fine-tuning holds 1.3 GB of trained weights and moments in each framework: run it apart
    # from the MoRA rows (second command above) on a machine with less than ~10 GB free
    b.steps = 5  # timed steps per method (a few seconds each on two cores)
    b.warmup = 1  # untimed steps per method
    b.xla_tuning_ablation = False  # the 250M benchmark has it; here it would add three more compiled models
    b.delta_weight.in_features = 576  # the model's MLP kernel (hidden x intermediate)
    b.delta_weight.out_features = 1536
    b.generation.batches = (1, 8)  # prompts per call
    b.generation.prompt_len = 64  # prompt tokens per row
    b.generation.new_tokens = 32  # tokens generated per row
    return c
