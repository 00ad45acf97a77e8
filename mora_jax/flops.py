"""The FLOP model: the matmul FLOPs one training step of a LLaMA model needs.

:func:`model_flops_per_step` is the analytic count behind every MFU the project reports, measured
(the CPU benchmark, :mod:`mora_jax.bench`) or estimated (the TPU planner, :mod:`mora_jax.plan`):
full fine-tuning, LoRA, MoRA of each type, or the frozen base model alone. :func:`flop_breakdown`
gives it by part, :func:`adapter_flops_per_token` per adapter. Nothing here runs a model: the
numbers come from the shapes alone (``tests/test_benchmark.py`` checks them against hand counts,
``tests/test_step_profile.py`` against the dots of the compiled step).
"""

from __future__ import annotations

from mora_jax import ops
from mora_jax.models.config import LlamaConfig

ADAPTER_METHODS = ("lora", "pissa", "dora", "hira", "mora")


def llama_kernel_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """``{projection: (in_features k, out_features d)}`` of one LLaMA block."""
    D, F = config.hidden_size, config.intermediate_size
    H, N, K = config.resolved_head_dim, config.num_attention_heads, config.resolved_kv_heads
    return {"q_proj": (D, N * H), "k_proj": (D, K * H), "v_proj": (D, K * H), "o_proj": (N * H, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def mora_columns_used(in_features: int, out_features: int, r_hat: int) -> int:
    """Type 6: the columns ``W`` of ``concat_c(rot_c(chunk_c)·M)`` that reach the output.

    The input is cut into ``n = ceil(k/r̂)`` chunks, each multiplied by ``M`` into ``r̂`` columns, and
    the ``n·r̂`` columns are truncated (or tiled) to ``d``: so ``W = min(d, n·r̂)``. When ``d`` ends
    inside a chunk, that chunk needs only its first ``d mod r̂`` columns (``mora_jax.ops``
    computes just those), and chunks past it none.
    """
    n = -(-in_features // r_hat)
    return min(out_features, n * r_hat)


def adapter_flops_per_token(k: int, d: int, method: str, r: int, mora_type: int | None = None) -> tuple[float, float]:
    """``(forward, input_gradient)`` matmul FLOPs per token of one adapter on a ``k × d`` kernel.

    LoRA: forward ``x@a`` and ``(xa)@b`` = ``2·r·(k+d)``; backward: ``d(xa) = dy@bᵀ`` and ``∇b`` (``2·r·d``
    each), ``∇a`` (``2·k·r``) and the input gradient ``dx = d(xa)@aᵀ`` (``2·k·r``), so backward =
    2 × forward of which ``2·k·r`` is the input gradient.
    MoRA types 1–4: compression/decompression are sums/copies (no matmul), ``z@m`` = ``2·r̂²``;
    backward ``∇m = zᵀ·du`` and ``dz = du·mᵀ``, one forward's worth each. Type 6: ``2·r̂·W`` for the
    ``W`` columns that reach the output (:func:`mora_columns_used`; ``2·n·r̂²`` when they are ``n``
    whole chunks), the same again for each of ``∇m`` and the input gradient.
    HiRA: zero: its layer runs one matmul with the effective kernel ``K ⊙ (1 + A·B)`` instead of the
    frozen ``x·K`` (forward and input gradient as the frozen model's); what it adds per token is the
    gradient of that kernel, :func:`adapter_weight_grad_flops_per_token`.
    """
    if method in ("lora", "pissa", "dora"):  # PiSSA is LoRA at run time; DoRA's per-token extra (the magnitude scaling) is elementwise
        return 2.0 * r * (k + d), 2.0 * k * r
    if method == "hira":  # one matmul with K ⊙ (1 + A·B) replaces the frozen one: nothing more per token
        return 0.0, 0.0
    if method == "mora":
        r_hat = ops.rank_hat(k, d, r, mora_type)
        width = mora_columns_used(k, d, r_hat) if mora_type == 6 else r_hat
        fwd = 2.0 * r_hat * width
        return fwd, fwd
    raise ValueError(f"adapter method must be 'lora', 'pissa', 'dora', 'hira' or 'mora', got {method!r}")


def adapter_flops_per_step(k: int, d: int, method: str, r: int) -> float:
    """Matmul FLOPs an adapter on a ``k × d`` kernel needs once per step, independent of the tokens.

    DoRA: the detached column norm ``‖K + s·A·B‖_c`` (``mora_jax.dora.weight_norm``): ``Aᵀ·K``
    (``2·k·d·r``), ``AᵀA`` (``2·k·r²``) and ``(AᵀA)·B`` (``2·r²·d``). HiRA: ``A·B`` for the effective
    kernel and, backward, ``∇A = G·Bᵀ`` and ``∇B = Aᵀ·G`` from ``G = ∂L/∂K' ⊙ K``: ``3 × 2·k·r·d``.
    Zero for the other methods.
    """
    if method == "dora":
        return 2.0 * k * d * r + 2.0 * k * r * r + 2.0 * r * r * d
    if method == "hira":
        return 3 * 2.0 * k * r * d
    return 0.0


def adapter_weight_grad_flops_per_token(k: int, d: int, method: str) -> float:
    """Matmul FLOPs per token an adapter on a ``k × d`` kernel spends on a dense weight gradient:
    HiRA's ``∂L/∂K' = xᵀ·dy`` (``2·k·d``, as full fine-tuning's), which its ``A``, ``B`` gradients need
    (``mora_jax.hira``); zero for the other methods, whose gradients stay low-rank."""
    return 2.0 * k * d if method == "hira" else 0.0


def attention_pairs(config: LlamaConfig, seq_len: int, *, skip_masked: bool = False) -> float:
    """Query-key pairs per head and sequence whose products attention computes: all ``T²`` (an
    implementation that masks the scores), or with ``skip_masked`` only those the causal (and sliding
    window) mask keeps, ``Σ_q min(q + 1, W)`` (what causal attention needs at all)."""
    T = seq_len
    if not skip_masked:
        return float(T * T)
    W = config.sliding_window if config.sliding_window is not None else T
    W = min(W, T)
    return float(W * (W + 1) // 2 + (T - W) * W)


def flop_breakdown(config: LlamaConfig, batch: int, seq_len: int, method: str, r: int | None = None,
                   mora_type: int | None = None, *, skip_dead_input_grads: bool = True,
                   trained_lm_head: bool = False, skip_masked_attention: bool = False) -> dict[str, float]:
    """Matmul FLOPs of one training step of a LLaMA model, by part (see :func:`model_flops_per_step`)."""
    if method not in ("full", "lora", "pissa", "dora", "hira", "mora", "frozen"):
        raise ValueError(f"method must be 'full', 'lora', 'pissa', 'dora', 'hira', 'mora' or 'frozen', got {method!r}")
    if method in ADAPTER_METHODS and not r:
        raise ValueError(f"{method} needs a rank r")
    if method == "mora" and mora_type is None:
        raise ValueError("mora needs a mora_type")
    tokens = batch * seq_len
    L, D, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    H, N = config.resolved_head_dim, config.num_attention_heads
    shapes = llama_kernel_shapes(config)
    block_params = sum(k * d for k, d in shapes.values())
    matmul_params = L * block_params + D * V  # LM head (or tied embedding.attend) included
    # Layer 0's q/k/v input gradient would flow only into the frozen embeddings: nothing needs it.
    dead = sum(k * d for p, (k, d) in shapes.items() if p in ("q_proj", "k_proj", "v_proj"))
    # QKᵀ and PV over the pairs computed (all T², or the causal ones when the implementation skips the rest)
    attention_forward = L * 4.0 * batch * attention_pairs(config, seq_len, skip_masked=skip_masked_attention) * N * H
    out = {
        "forward": 2.0 * matmul_params * tokens,
        "attention_forward": attention_forward,
        "input_grad": 2.0 * (matmul_params - (dead if skip_dead_input_grads else 0)) * tokens,
        "attention_backward": 2.0 * attention_forward,  # dP, dV, dQ, dK
        "weight_grad": (2.0 * L * block_params * tokens if method == "full" else 0.0)
                       + (2.0 * D * V * tokens if trained_lm_head else 0.0),
        "adapter": 0.0,
    }
    if method in ADAPTER_METHODS:
        per_token = per_step = 0.0
        for proj, (k, d) in shapes.items():
            fwd, in_grad = adapter_flops_per_token(k, d, method, r, mora_type)
            per_token += L * (3.0 * fwd + adapter_weight_grad_flops_per_token(k, d, method))
            per_step += L * adapter_flops_per_step(k, d, method, r)
            if skip_dead_input_grads and proj in ("q_proj", "k_proj", "v_proj"):
                per_token -= in_grad
        out["adapter"] = per_token * tokens + per_step
    return out


def model_flops_per_step(config: LlamaConfig, batch: int, seq_len: int, method: str, r: int | None = None,
                         mora_type: int | None = None, *, skip_dead_input_grads: bool = True,
                         trained_lm_head: bool = False, skip_masked_attention: bool = False) -> float:
    """The matmul FLOPs one training step of ``method`` really needs (a multiply-add = 2 FLOPs).

    For a LLaMA model with all seven projections of every block adapted (or, for ``"full"``,
    trained), ``tokens = batch·seq_len``, ``P`` = the projections' and LM head's parameters:

    * forward: ``2·P·tokens`` plus attention ``QKᵀ`` and ``PV``: ``4·B·T²·N·H`` per layer (the full
      ``T × T`` product: the einsum implementation masks, it does not skip). With
      ``skip_masked_attention`` (an implementation that skips masked products, like the Pallas kernel
      on TPU) only the pairs the causal / sliding-window mask keeps count (:func:`attention_pairs`,
      ``T(T+1)/2`` for causal attention): counting the skipped half would credit a step with work no
      chip did, and an estimate of it could exceed 100% MFU;
    * backward, every kernel: the input gradient, another ``2·P·tokens``; attention backward is
      twice its forward;
    * backward, trained kernels (``"full"`` only): the weight gradient, another ``2·P_blocks·tokens``;
      the LM head's, ``2·D·V·tokens``, only with ``trained_lm_head`` (a recipe that unfreezes it,
      like the reference's pretraining);
    * adapters (``"lora"``/``"dora"``/``"mora"``): their own matmuls, three times the forward
      (:func:`adapter_flops_per_token`): LoRA and DoRA ``2·tokens·r·(k+d)·3`` (DoRA adds its
      per-step column norm, :func:`adapter_flops_per_step`); MoRA ``2·tokens·r̂²·3`` (types
      1–4) or ``2·tokens·r̂·W·3`` (type 6, ``W`` of its ``n·r̂`` product columns reaching the output);
      HiRA (``"hira"``) the dense gradient of its effective kernel, ``2·tokens·k·d`` (full
      fine-tuning's weight gradient: HiRA's floor is ``full``'s FLOPs plus ``6·k·r·d`` per kernel and
      step, :func:`adapter_weight_grad_flops_per_token`, :func:`adapter_flops_per_step`);
    * ``"frozen"``: the base model alone with every kernel frozen (what any adapter method pays
      before its adapter matmuls), so ``full − frozen`` is exactly the weight-gradient term.

    Embedding lookups, norms, softmax, the loss and the optimizer are not matmuls and not counted.
    With ``skip_dead_input_grads`` (default) the input gradients of layer 0's q/k/v projections
    (kernels and adapters) are not counted: they flow only into the frozen embeddings, and JAX's
    autodiff never computes them. ``False`` gives the plain textbook formula.
    """
    return float(sum(flop_breakdown(config, batch, seq_len, method, r, mora_type,
                                    skip_dead_input_grads=skip_dead_input_grads, trained_lm_head=trained_lm_head,
                                    skip_masked_attention=skip_masked_attention).values()))


__all__ = ["ADAPTER_METHODS", "adapter_flops_per_step", "adapter_flops_per_token", "adapter_weight_grad_flops_per_token",
           "attention_pairs", "flop_breakdown", "llama_kernel_shapes", "model_flops_per_step", "mora_columns_used"]
