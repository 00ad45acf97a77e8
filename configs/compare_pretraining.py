"""The pretraining comparison (full, LoRA, ReLoRA, MoRA, ReMoRA and the PEFT family from scratch on the
same tokens), each method at its own tuned learning rate:

    python -m train.compare_pretraining --config=configs/compare_pretraining.py:cpu --seeds=3
    python -m train.compare_pretraining --config=configs/compare_pretraining.py:tiny   # seconds: a pipeline check

The run settings are ``configs/c4_pretrain.py``'s variant of the same name; ``experiment`` adds the
sweep: every method trains ``sweep_steps`` steps at each rate of its grid (seed ``config.seed``), the
rate with the lowest eval loss at the end is chosen, and every other seed then trains ``train.steps`` at it.
"""

import ml_collections

from configs import c4_pretrain

ADAPTER_LRS = (1e-3, 3e-3, 1e-2, 3e-2)  # half-decade grid around c4_pretrain.py:cpu's shared 3e-3
FULL_LRS = (3e-4, 1e-3, 3e-3, 1e-2)  # every parameter trained: a grid shifted down by half a decade


def get_config(variant: str = "cpu"):
    if variant not in ("cpu", "tiny"):
        raise ValueError(f"unknown variant {variant!r}: use cpu (minutes per run on 2 CPU cores) or tiny (seconds)")
    c = c4_pretrain.get_config(variant)
    c.workdir = f"runs/compare_pretraining_{variant}"  # results.md/json, perplexity.png, sweep.png, one folder per run
    e = c.experiment = ml_collections.ConfigDict()
    e.lrs = ml_collections.ConfigDict({  # peak learning rates each method's sweep tries (>= 4 distinct, log-spaced)
        "full": FULL_LRS,
        "lora": ADAPTER_LRS, "relora": ADAPTER_LRS, "mora": ADAPTER_LRS, "remora": ADAPTER_LRS,
        "dora": ADAPTER_LRS, "pissa": ADAPTER_LRS, "mora_mag": ADAPTER_LRS, "remora_mag": ADAPTER_LRS,
        # HiRA's update is K ⊙ (A·B): on K's small random values its useful rates sit an order of magnitude higher
        "hira": tuple(10.0 * x for x in ADAPTER_LRS),
    })
    # the sweep's budget: the whole run. From scratch, LoRA sits on a plateau for the first half of it at
    # every rate of its grid (eval loss 6.44-6.45 after 100 of 200 steps), so a half-length sweep picks
    # its rate by noise; a full-length one costs no run more than it saves (the chosen run is seed 0's)
    e.sweep_steps = c.train.steps
    return c
