"""Entry point: fine-tune with MoRA / LoRA / full fine-tuning (see configs/ and docs/training.md).

    python -m train.finetune --config=configs/math_finetune.py:tiny [--config.FIELD=VALUE ...]
"""

from train.runner import main

if __name__ == "__main__":
    main("finetune")
