"""Entry point: pretrain with MoRA / LoRA / full fine-tuning (see configs/ and docs/training.md).

    python -m train.pretrain --config=configs/c4_pretrain.py:tiny [--config.FIELD=VALUE ...]
"""

from train.runner import main

if __name__ == "__main__":
    main("pretrain")
