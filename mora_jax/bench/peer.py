"""The PyTorch peer of the benchmark: the same LLaMA in Hugging Face ``transformers`` on the same CPU.

``python -m train.benchmark --peer`` times, next to mora-jax's rows:

- full fine-tuning of the seven projections (plain ``transformers``);
- LoRA at both ranks through Hugging Face PEFT;
- MoRA types 1 and 6 at both ranks, as the authors' PEFT fork computes them: eager PyTorch ops on
  each projection's input (wrap-pad by concatenation, a view into ``r̂``-chunks, a sum over chunks
  or a rotation of every chunk, ``@ M``, then a tile or a truncation), written here from
  ``docs/mora.md`` because the fork is not on PyPI (:class:`TorchMoRALinear`; a test checks it
  against :func:`mora_jax.ops.apply_mora`).

torch, transformers and peft are optional (``pip install -e ".[bench]"``); without them
:func:`run_peer` raises :class:`PeerUnavailable` naming the pip command.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable

import jax.numpy as jnp
import numpy as np

from mora_jax import ops
from mora_jax.bench.methods import LORA_ALPHA, MethodSpec, method_specs
from mora_jax.flops import model_flops_per_step
from mora_jax.models.config import LlamaConfig

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEER_INSTALL = "pip install torch==2.13.0 transformers peft"


class PeerUnavailable(RuntimeError):
    """torch / transformers / peft are not installed."""


def import_peer():
    """``(torch, transformers, peft)``, or :class:`PeerUnavailable` naming the pip command."""
    try:
        import peft
        import torch
        import transformers
    except ImportError as e:
        raise PeerUnavailable(f"--peer needs torch, transformers and peft ({e}); install them with: {PEER_INSTALL}") from None
    return torch, transformers, peft


def torch_mora_linear_class():
    """The ``TorchMoRALinear`` module class (built on first use: torch is optional)."""
    torch, _, _ = import_peer()
    nn = torch.nn

    class TorchMoRALinear(nn.Module):
        """``base(x) + decompress(compress(x) @ M)`` around a frozen ``nn.Linear``, eager, like the
        reference: ``M`` is ``(r̂, r̂)`` in kernel layout (``u = z @ M``), zero at start."""

        def __init__(self, base: nn.Linear, r: int, mora_type: int):
            super().__init__()
            if mora_type not in (1, 6):
                raise ValueError(f"the PyTorch peer implements MoRA types 1 and 6, not {mora_type}")
            self.base = base
            self.k, self.d = base.in_features, base.out_features
            self.mora_type = mora_type
            self.r_hat = ops.rank_hat(self.k, self.d, r, mora_type)
            self.n_chunks = -(-self.k // self.r_hat)
            self.m = nn.Parameter(torch.zeros(self.r_hat, self.r_hat, dtype=base.weight.dtype))
            if mora_type == 6:
                cos, sin = ops.rope_cos_sin(self.r_hat, self.n_chunks)
                self.register_buffer("cos", torch.from_numpy(np.array(cos)), persistent=False)
                self.register_buffer("sin", torch.from_numpy(np.array(sin)), persistent=False)

        def _pad(self, x):
            pad = self.n_chunks * self.r_hat - self.k
            if pad == 0:
                return x
            if pad <= self.k:  # the reference's concatenation
                return torch.cat([x, x[..., :pad]], dim=-1)
            index = torch.arange(self.n_chunks * self.r_hat, device=x.device) % self.k
            return x[..., index]

        def delta(self, x):
            chunks = self._pad(x).view(*x.shape[:-1], self.n_chunks, self.r_hat)
            if self.mora_type == 1:
                u = chunks.sum(dim=-2) @ self.m
                reps = -(-self.d // self.r_hat)
                out = torch.cat([u] * reps, dim=-1) if reps > 1 else u
            else:
                half = self.r_hat // 2
                rotated_half = torch.cat([-chunks[..., half:], chunks[..., :half]], dim=-1)
                rotated = chunks * self.cos.to(chunks.dtype) + rotated_half * self.sin.to(chunks.dtype)
                out = (rotated @ self.m).reshape(*x.shape[:-1], self.n_chunks * self.r_hat)
                reps = -(-self.d // out.shape[-1])
                if reps > 1:
                    out = torch.cat([out] * reps, dim=-1)
            return out[..., : self.d]

        def forward(self, x):
            return self.base(x) + self.delta(x)

    return TorchMoRALinear


def add_torch_mora(model, r: int, mora_type: int, projections=LLAMA_PROJECTIONS) -> int:
    """Freeze ``model`` and wrap every projection ``nn.Linear`` in a ``TorchMoRALinear``; returns
    how many layers were wrapped."""
    torch, _, _ = import_peer()
    cls = torch_mora_linear_class()
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules()
               if name.rsplit(".", 1)[-1] in projections and isinstance(module, torch.nn.Linear)]
    for name, module in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[-1], cls(module, r, mora_type))
    return len(targets)


def peer_specs(config) -> list[MethodSpec]:
    """The benchmark's methods that the peer implements (MoRA types 1 and 6 only)."""
    ranks = tuple(dict.fromkeys((int(config.r_small), int(config.r_large))))
    return method_specs(ranks, [int(t) for t in config.mora_types if int(t) in (1, 6)])


def run_peer(config, llama_config: LlamaConfig, peak_flops: float, *, log: Callable[[str], None] = print) -> list[dict]:
    """Time full fine-tuning, HF PEFT LoRA and the reference's MoRA (``r_small``, ``r_large``) of the
    same-size ``LlamaForCausalLM`` on this CPU (all cores, same batch and sequence length, AdamW,
    median step). Rows carry ``framework``, ``method``, ``r``, ``mora_type``, ``step_s``, ``mfu``."""
    torch, transformers, peft = import_peer()
    threads = int(config.peer.get("threads", 0)) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(int(config.seed))
    hf = llama_config.to_hf_dict()
    hf.pop("architectures", None)
    hf.pop("model_type", None)
    hf["torch_dtype"] = "float32"
    batch_size, seq_len = int(config.batch), int(config.seq_len)
    tokens = batch_size * seq_len
    ids = torch.from_numpy(np.random.default_rng(int(config.seed)).integers(
        0, llama_config.vocab_size, (batch_size, seq_len)))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[jnp.dtype(config.dtype).name]
    # PyTorch's own matmul peak (same chain as the JAX one): its MFU is also given against it.
    size, chain = int(config.matmul_size), int(config.matmul_chain)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype) / math.sqrt(size)
    best = math.inf
    for _ in range(int(config.matmul_repeats) + 1):
        t0 = time.perf_counter()
        x = a
        for _ in range(chain):
            x = x @ b
        best = min(best, time.perf_counter() - t0)
    torch_peak = chain * 2.0 * size ** 3 / best
    log(f"peer: torch matmul peak {torch_peak / 1e9:.1f} GFLOP/s ({threads} threads)")
    del a, b, x
    rows = []
    for spec in peer_specs(config):
        hf_config = transformers.LlamaConfig(**hf)
        hf_config._attn_implementation = "eager"
        model = transformers.LlamaForCausalLM(hf_config).to(dtype)
        model.train()
        framework = f"torch {torch.__version__} + transformers {transformers.__version__}"
        if spec.method == "lora":
            lora = peft.LoraConfig(r=spec.r, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                                   target_modules=list(LLAMA_PROJECTIONS))
            model = peft.get_peft_model(model, lora)
            framework += f" + peft {peft.__version__}"
        elif spec.method == "mora":
            add_torch_mora(model, spec.r, spec.mora_type)
            framework += " + MoRA (the reference's eager ops)"
        else:
            for name, p in model.named_parameters():
                p.requires_grad_(any(f"{proj}." in name for proj in LLAMA_PROJECTIONS))
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=float(config.lr))

        def step():
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(int(config.warmup)):
            step()
        times = []
        for _ in range(int(config.peer.get("steps", config.steps))):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        flops = model_flops_per_step(llama_config, batch_size, seq_len, spec.method, spec.r, spec.mora_type)
        rows.append({"framework": framework, "method": spec.method, "r": spec.r, "mora_type": spec.mora_type,
                     "step_s": step_s, "tokens_per_s": tokens / step_s,
                     "model_flops_per_step": flops, "mfu": flops / step_s / peak_flops, "threads": threads,
                     "torch_peak_matmul_flops": torch_peak, "mfu_vs_torch_peak": flops / step_s / torch_peak,
                     "step_s_all": times})
        log(f"peer {spec.label:<14}: {step_s:.4f} s")
        del model, opt
    return rows


def peer_comparison(result) -> list[dict]:
    """mora-jax against the peer, method by method: ``tokens_per_s`` ratios (``>1``: mora-jax faster)."""
    ours = {(r["method"], r["r"], r["mora_type"]): r for r in result["results"]}
    out = []
    for p in result.get("peer", []):
        mine = ours.get((p["method"], p["r"], p.get("mora_type")))
        if mine is not None:
            out.append({"method": p["method"], "r": p["r"], "mora_type": p.get("mora_type"),
                        "tokens_per_s": mine["tokens_per_s"], "peer_tokens_per_s": p["tokens_per_s"],
                        "speedup": mine["tokens_per_s"] / p["tokens_per_s"]})
    return out


__all__ = ["LLAMA_PROJECTIONS", "PEER_INSTALL", "PeerUnavailable", "add_torch_mora", "import_peer", "peer_comparison",
           "peer_specs", "run_peer", "torch_mora_linear_class"]
