"""The PyTorch peer of the benchmark: the same LLaMA in Hugging Face ``transformers`` on the same CPU.

``python -m train.benchmark --peer`` times, next to mora-jax's rows:

- full fine-tuning of the seven projections (plain ``transformers``);
- LoRA at both ranks through Hugging Face PEFT;
- DoRA (``LoraConfig(use_dora=True)``), PiSSA (``init_lora_weights="pissa_niter_4"``, on private
  copies of the projections since PEFT rewrites the base to the residual) and HiRA (``HiraConfig``)
  through PEFT at ``r_small``, those of ``benchmark.peft_methods``;
- MoRA types 1 and 6 at both ranks, as the authors' PEFT fork computes them: eager PyTorch ops on
  each projection's input (wrap-pad by concatenation, a view into ``r̂``-chunks, a sum over chunks
  or a rotation of every chunk, ``@ M``, then a tile or a truncation), written here from
  ``docs/mora.md`` because the fork is not on PyPI (:class:`TorchMoRALinear`; a test checks it
  against :func:`mora_jax.ops.apply_mora`).

Each method's PyTorch step is a runner like mora-jax's (:class:`TorchStepRunner`), timed in the
same round-robin rotation as mora-jax's steps and beside PyTorch's own matmul peak
(:class:`TorchMatmulRunner`), so background load hits both frameworks alike; every method's model
shares one set of frozen base weights (:class:`TorchModels`; random, like a preset's: the timings
do not depend on the values). :func:`generation_comparison` times greedy generation of the base
model in both frameworks the same way.

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
from mora_jax.bench.generation import GenerateRunner, PrefillRunner
from mora_jax.bench.methods import LORA_ALPHA, PISSA_NITER, MethodSpec, method_specs
from mora_jax.bench.runners import run_interleaved
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


def peer_specs(bench) -> list[MethodSpec]:
    """The benchmark's methods that the peer implements (MoRA types 1 and 6 only; no MoRA with a magnitude:
    neither PEFT nor the reference has it)."""
    return method_specs(bench.ranks, [t for t in bench.mora_types if t in (1, 6)], include_full=bench.full,
                        peft_methods=[m for m in bench.peft_methods if m != "mora_mag"])


class TorchModels:
    """The PyTorch twin of the benchmark's model: its ``transformers.LlamaConfig`` and one set of
    base weights (random, the same shapes) that every method's model shares (frozen weights are
    not copied per method; full fine-tuning trains private copies of the projections)."""

    def __init__(self, llama_config: LlamaConfig, *, dtype: str = "float32", attention: str = "sdpa",
                 threads: int = 0, seed: int = 0):
        torch, transformers, _ = import_peer()
        self.threads = threads or os.cpu_count() or 1
        torch.set_num_threads(self.threads)
        torch.manual_seed(seed)
        hf = llama_config.to_hf_dict()
        for key in ("architectures", "model_type", "torch_dtype", "dtype"):
            hf.pop(key, None)
        self.hf_config = transformers.LlamaConfig(**hf)
        self.hf_config._attn_implementation = attention
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            jnp.dtype(dtype).name]
        self.attention = attention
        self.base = self.model()

    def model(self):
        """A ``LlamaForCausalLM`` on the shared weights (the first one owns them)."""
        _, transformers, _ = import_peer()
        model = transformers.LlamaForCausalLM(self.hf_config).to(self.dtype)
        if getattr(self, "base", None) is not None:
            model.load_state_dict(self.base.state_dict(), assign=True)
            model.tie_weights()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def framework(self) -> str:
        torch, transformers, _ = import_peer()
        return f"torch {torch.__version__} + transformers {transformers.__version__} ({self.attention} attention)"


class TorchStepRunner:
    """One method's PyTorch training step (forward with labels, backward, global-norm clipping at 1,
    AdamW), timed call by call like :class:`mora_jax.bench.runners.StepRunner`."""

    def __init__(self, spec: MethodSpec, models: TorchModels, ids, *, lr: float = 1e-4):
        torch, _, peft = import_peer()
        self.spec = spec
        model = models.model()
        model.train()
        self.framework, self.threads = models.framework(), models.threads
        if spec.method in ("full", "pissa"):  # private copies of the projections: trained, or PiSSA's residual
            for name, module in model.named_modules():
                if name.rsplit(".", 1)[-1] in LLAMA_PROJECTIONS:
                    module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=spec.method == "full")
        if spec.method in ("lora", "dora", "pissa", "hira"):
            targets = list(LLAMA_PROJECTIONS)
            if spec.method == "hira":
                config = peft.HiraConfig(r=spec.r, hira_dropout=0.0, target_modules=targets)
            else:
                init = f"pissa_niter_{PISSA_NITER}" if spec.method == "pissa" else True
                config = peft.LoraConfig(r=spec.r, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                                         target_modules=targets, use_dora=spec.method == "dora", init_lora_weights=init)
            model = peft.get_peft_model(model, config)
            self.framework += f" + peft {peft.__version__}"
        elif spec.method == "mora":
            add_torch_mora(model, spec.r, spec.mora_type)
            self.framework += " + MoRA (the reference's eager ops)"
        self.model, self.ids = model, ids
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=lr)
        self.times: list[float] = []

    def step(self, record: bool = True) -> float:
        torch, _, _ = import_peer()
        t0 = time.perf_counter()
        out = self.model(input_ids=self.ids, labels=self.ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
        self.last_loss = float(out.loss.detach())
        return dt

    def release(self):
        self.model = self.opt = self.trainable = self.ids = None


class TorchMatmulRunner:
    """PyTorch's matmul peak: the same chain of ``size × size`` matmuls as
    :class:`mora_jax.bench.runners.MatmulRunner`, timed in the same rotation; ``flops`` is the best."""

    def __init__(self, dtype, *, size: int = 2048, chain: int = 4):
        torch, _, _ = import_peer()
        self.a = torch.randn(size, size, dtype=dtype)
        self.b = torch.randn(size, size, dtype=dtype) / math.sqrt(size)
        self.chain, self.work = chain, chain * 2.0 * size ** 3
        self.times: list[float] = []

    def step(self, record: bool = True) -> float:
        t0 = time.perf_counter()
        x = self.a
        for _ in range(self.chain):
            x = x @ self.b
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
        return dt

    @property
    def flops(self) -> float:
        return self.work / min(self.times)

    def release(self):
        self.a = self.b = None


def peer_runners(bench, models: TorchModels, batch, *, log: Callable[[str], None] = print):
    """``(matmul runner, [step runner per method of peer_specs])`` on ``batch``'s tokens."""
    torch, _, _ = import_peer()
    ids = torch.from_numpy(np.asarray(batch["input_ids"], np.int64))
    matmul = TorchMatmulRunner(models.dtype, size=bench.matmul_size, chain=bench.matmul_chain)
    steps = [TorchStepRunner(spec, models, ids, lr=bench.run.optim.lr) for spec in peer_specs(bench)]
    log(f"peer: {len(steps)} PyTorch methods ({models.threads} threads, {bench.peer.attention} attention)")
    return matmul, steps


def peer_rows(bench, llama_config: LlamaConfig, matmul: TorchMatmulRunner, steps, peak_flops: float) -> list[dict]:
    """The timed peer runners as result rows: ``framework``, ``method``, ``r``, ``mora_type``,
    ``step_s`` (median), ``tokens_per_s``, ``mfu`` (against mora-jax's peak) and against PyTorch's."""
    b, t = bench.run.train.batch_size, bench.run.train.seq_len
    torch_peak = matmul.flops
    rows = []
    for runner in steps:
        spec, step_s = runner.spec, statistics.median(runner.times)
        flops = model_flops_per_step(llama_config, b, t, spec.flops_method, spec.r, spec.mora_type)
        rows.append({"framework": runner.framework, "method": spec.method, "r": spec.r, "mora_type": spec.mora_type,
                     "step_s": step_s, "tokens_per_s": b * t / step_s, "model_flops_per_step": flops,
                     "mfu": flops / step_s / peak_flops, "threads": runner.threads,
                     "torch_peak_matmul_flops": torch_peak, "mfu_vs_torch_peak": flops / step_s / torch_peak,
                     "step_s_all": runner.times, "step_s_min": min(runner.times), "loss": runner.last_loss})
    return rows


def run_peer(bench, llama_config: LlamaConfig, batch, peak_flops: float, *,
             log: Callable[[str], None] = print) -> list[dict]:
    """The peer alone (not interleaved with mora-jax's steps): full fine-tuning, HF PEFT LoRA and
    the reference's MoRA of the same-size ``LlamaForCausalLM`` on ``batch``'s tokens (same batch and
    sequence length, AdamW, median of ``bench.steps`` after ``bench.warmup``)."""
    run = bench.run
    models = TorchModels(llama_config, dtype=run.model.dtype, attention=bench.peer.attention,
                         threads=bench.peer.threads, seed=run.seed)
    matmul, steps = peer_runners(bench, models, batch, log=log)
    run_interleaved([matmul, *steps], bench.steps, bench.warmup, bench.interleave)
    rows = peer_rows(bench, llama_config, matmul, steps, peak_flops)
    for runner in [matmul, *steps]:
        runner.release()
    return rows


class TorchPrefillRunner:
    """The prompt through the PyTorch model into a fresh KV cache (``use_cache=True``, no gradients)."""

    def __init__(self, model, ids):
        self.model, self.ids = model, ids
        self.times: list[float] = []

    def step(self, record: bool = True) -> float:
        torch, _, _ = import_peer()
        t0 = time.perf_counter()
        with torch.no_grad():
            self.model(input_ids=self.ids, use_cache=True)
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
        return dt

    def release(self):
        self.model = self.ids = None


class TorchGenerateRunner(TorchPrefillRunner):
    """One greedy ``model.generate`` call that always makes ``new_tokens`` tokens (``min_new_tokens``)."""

    def __init__(self, model, ids, new_tokens: int):
        super().__init__(model, ids)
        self.new_tokens = new_tokens

    def step(self, record: bool = True) -> float:
        torch, _, _ = import_peer()
        t0 = time.perf_counter()
        out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=self.new_tokens,
                                  min_new_tokens=self.new_tokens, do_sample=False, pad_token_id=0)
        dt = time.perf_counter() - t0
        if out.shape != (self.ids.shape[0], self.ids.shape[1] + self.new_tokens):
            raise AssertionError(f"generate returned {tuple(out.shape)}, expected {self.new_tokens} new tokens per row")
        if record:
            self.times.append(dt)
        return dt


def _generation_row(framework: str, batch: int, prompt_len: int, new_tokens: int, prefill, whole) -> dict:
    prefill_s, generate_s = statistics.median(prefill.times), statistics.median(whole.times)
    decode_s = (generate_s - prefill_s) / (new_tokens - 1)
    return {"framework": framework, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prefill_s": prefill_s, "generate_s": generate_s, "decode_s_per_step": decode_s,
            "prefill_tokens_per_s": batch * prompt_len / prefill_s,
            "decode_tokens_per_s": batch / decode_s if decode_s > 0 else None,
            "generate_new_tokens_per_s": batch * new_tokens / generate_s,
            "prefill_s_all": prefill.times, "generate_s_all": whole.times}


def generation_comparison(bench, model, params, models: TorchModels, *, log: Callable[[str], None] = print) -> dict:
    """Greedy generation of the base model (no adapter, never stopping early) in both frameworks:
    ``mora_jax.generate`` against ``transformers``' ``generate`` (KV cache), for each batch of
    ``bench.generation``, the four programs per batch timed interleaved round-robin. Decode per step
    = (generate − prefill) / (new tokens − 1) in both."""
    torch, _, _ = import_peer()
    g = bench.generation
    P, N = g.prompt_len, g.new_tokens
    max_len = model.config.max_position_embeddings
    if P + N > max_len:
        raise ValueError(f"benchmark.generation: prompt_len {P} + new_tokens {N} exceed the model's "
                         f"max_position_embeddings {max_len}")
    models.base.eval()
    rng = np.random.default_rng(bench.run.seed)
    entries = []
    for batch in g.batches:
        ids = rng.integers(0, model.config.vocab_size, (batch, P)).astype(np.int32)
        torch_ids = torch.from_numpy(ids.astype(np.int64))
        entries.append((batch, PrefillRunner(model, params, ids, N), GenerateRunner(model, params, ids, N),
                        TorchPrefillRunner(models.base, torch_ids), TorchGenerateRunner(models.base, torch_ids, N)))
    log(f"generation: batches {list(g.batches)}, prompt {P} + {N} new tokens, mora-jax and PyTorch interleaved")
    run_interleaved([r for entry in entries for r in entry[1:]], g.repeats, g.warmup)
    rows = []
    for batch, jax_prefill, jax_generate, torch_prefill, torch_generate in entries:
        rows.append(_generation_row("mora-jax", batch, P, N, jax_prefill, jax_generate))
        rows.append(_generation_row(models.framework(), batch, P, N, torch_prefill, torch_generate))
        for runner in (jax_prefill, jax_generate, torch_prefill, torch_generate):
            runner.release()
    ratios = []
    for ours, theirs in zip(rows[::2], rows[1::2]):
        ratios.append({"batch": ours["batch"],
                       "generate_speedup": ours["generate_new_tokens_per_s"] / theirs["generate_new_tokens_per_s"],
                       "prefill_speedup": ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"],
                       "decode_speedup": (ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
                                          if ours["decode_tokens_per_s"] and theirs["decode_tokens_per_s"] else None)})
    return {"settings": {"batches": list(g.batches), "prompt_len": P, "new_tokens": N, "repeats": g.repeats,
                         "warmup": g.warmup},
            "what": "greedy generation of the base model (random weights, no adapter), never stopping early; "
                    "mora_jax.generate vs transformers generate (KV cache); compile excluded; median of the timed "
                    "calls, the programs interleaved round-robin",
            "rows": rows, "ratios": ratios}


def peer_comparison(result) -> list[dict]:
    """mora-jax against the peer, method by method: ``tokens_per_s`` ratios (``>1``: mora-jax faster),
    the step time over PyTorch PEFT LoRA's at the same rank (mora-jax's, ``step_over_peft_lora``, and
    PyTorch's own, ``peer_step_over_peft_lora``: e.g. PEFT's DoRA over PEFT's LoRA), and the two
    frameworks' matmul peaks (``peak_ratio``: mora-jax's / PyTorch's, what the hardware use alone would give)."""
    ours = {(r["method"], r["r"], r["mora_type"]): r for r in result["results"]}
    peft_lora = {p["r"]: p for p in result.get("peer", []) if p["method"] == "lora"}
    out = []
    for p in result.get("peer", []):
        mine = ours.get((p["method"], p["r"], p.get("mora_type")))
        if mine is not None:
            lora = peft_lora.get(p["r"])
            torch_peak = p.get("torch_peak_matmul_flops")
            out.append({"method": p["method"], "r": p["r"], "mora_type": p.get("mora_type"),
                        "tokens_per_s": mine["tokens_per_s"], "peer_tokens_per_s": p["tokens_per_s"],
                        "speedup": mine["tokens_per_s"] / p["tokens_per_s"],
                        "step_over_peft_lora": mine["step_s"] / lora["step_s"] if lora else None,
                        "peer_step_over_peft_lora": p["step_s"] / lora["step_s"] if lora else None,
                        "peak_matmul_flops": result["peak_matmul_flops"], "peer_peak_matmul_flops": torch_peak,
                        "peak_ratio": result["peak_matmul_flops"] / torch_peak if torch_peak else None})
    return out


__all__ = ["LLAMA_PROJECTIONS", "PEER_INSTALL", "PeerUnavailable", "TorchGenerateRunner", "TorchMatmulRunner", "TorchModels",
           "TorchPrefillRunner", "TorchStepRunner", "generation_comparison",
           "add_torch_mora", "import_peer", "peer_comparison", "peer_rows", "peer_runners", "peer_specs", "run_peer",
           "torch_mora_linear_class"]
