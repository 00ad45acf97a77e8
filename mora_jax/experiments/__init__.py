"""Experiments built on the library (the core package never imports them).

``uuid_memorization``: the paper's UUID memorization table (``python -m train.uuid_memorization``),
on the synthetic task of ``uuid_task``.
``compare_pretraining``: full training, LoRA, ReLoRA, MoRA and ReMoRA from scratch on real prose
(``prose``), ``python -m train.compare_pretraining``.
``compare_finetuning``: the paper's fine-tuning experiments on a pretrained model with a
learning-rate sweep per method (``python -m train.compare_finetuning``); its tasks in
``finetune_tasks`` (data and scoring helpers in ``task_data``, WordNet questions in ``wordnet``).
``runs`` (resumable run records, mean ± std, the compilation cache, progress) and ``provenance``
serve them all.
"""
