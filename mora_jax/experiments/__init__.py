"""Experiments built on the library (the core package never imports them).

``uuid_memorization``: the paper's UUID memorization table (``python -m train.uuid_memorization``),
on the synthetic task of ``uuid_task``.
"""
