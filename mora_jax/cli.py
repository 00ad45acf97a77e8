"""The ``mora-jax`` command line.

  mora-jax merge --base HF_DIR --adapter ADAPTER_DIR --out OUT_DIR [--dtype float32|bfloat16] [--overwrite]
                 [--allow-pickle]
      Fold a PEFT adapter (MoRA reference format or plain LoRA) into a Hugging Face LLaMA checkpoint
      and write the merged model (plus the base's generation config and tokenizer files) to OUT_DIR.
      Every file is written under a temporary name and renamed into place (no half-written file after
      a crash; a symlink in OUT_DIR is replaced, never followed), with the usual umask permissions.
      NaN or infinite values in the adapter, the base or the merged weights are refused
      (mora_jax.hf.merge.merge_adapter_dir does the work).
  mora-jax info ADAPTER_DIR
      Describe an adapter: method, type, r, r̂ per module, trainable parameter count.
  mora-jax generate --base HF_DIR [--adapter ADAPTER_DIR] --prompt TEXT [--prompt TEXT ...]
                    [--max-new-tokens N] [--chat] [--temperature T --top-k K --top-p P --seed S]
                    [--quantize int8|int4|nf4|q8_0|q4_0|q4_1 [--block-size N]]
      Continue each prompt with the base model (plus the adapter, unmerged) and the checkpoint's own
      tokenizer; --chat wraps each prompt in the tokenizer's chat template. Greedy by default.
      --quantize stores the base's projections quantized (weight-only, mora_jax.quant).
  mora-jax convert-gguf FILE OUT_DIR [--dtype float32|bfloat16|float16] [--overwrite]
      Write a GGUF model (llama.cpp's format: Llama, Mistral, Qwen2; float or quantized) as a Hugging
      Face directory: config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the
      chat template) and generation_config.json (mora_jax.gguf.weights.convert_gguf; no torch needed).

User errors (missing or malformed files, adapters that do not fit the base model, an existing or
unwritable output directory, ...) are reported on stderr as one ``mora-jax: error: ...`` line naming
the file, with exit status 1.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from mora_jax.errors import UserError
from mora_jax.hf.merge import OUT_DTYPES, checked_weights, merge_adapter_dir

# The dtypes convert-gguf may write.
GGUF_DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------


def merge_command(args) -> int:
    merged = merge_adapter_dir(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite,
                               allow_pickle=args.allow_pickle,
                               log=lambda message: print(message, file=sys.stderr, flush=True))
    config = merged.adapter_config
    method = (f"MoRA type {config.mora_type}" if config.method == "mora"
              else {"dora": "DoRA", "hira": "HiRA"}.get(config.method, "LoRA"))
    print(
        f"merged {merged.n_kernels} kernels ({method}, r={config.r}) from {pathlib.Path(args.adapter)} into "
        f"{pathlib.Path(args.base)}; wrote {merged.out_dir} ({merged.dtype}"
        + (f"; copied {', '.join(merged.copied)})" if merged.copied else ")")
    )
    return 0


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------


def describe_adapter(path) -> str:
    """A short human-readable description of the adapter directory ``path`` (no base model needed)."""
    import re

    from mora_jax.hf.peft_files import check_supported, parse_tensor_name, read_adapter_config, read_adapter_tensors
    from mora_jax.ops import lora_scale

    raw = read_adapter_config(path)
    check_supported(raw, str(path))
    tensors = read_adapter_tensors(path)
    use_hira = raw.get("peft_type") == "HIRA"
    use_mora = bool(raw.get("use_mora")) and not use_hira
    r = raw["r"]
    kinds: dict[str, dict[tuple, int]] = {}  # module kind (layer index removed) -> {shape: count}
    n_modules = n_trainable = 0
    for name, array in sorted(tensors.items()):
        parsed = parse_tensor_name(name)
        if parsed is None:
            continue
        module, part = parsed
        part = {"hira_A": "lora_A", "hira_B": "lora_B"}.get(part, part)  # same layout as LoRA's
        if part == "lora_B" and use_mora:
            continue  # MoRA's lora_B is the same matrix as lora_A
        kind = re.sub(r"(^|\.)layers\.\d+\.", r"\1layers.*.", module)
        key = (part, tuple(array.shape))
        kinds.setdefault(kind, {})
        kinds[kind][key] = kinds[kind].get(key, 0) + 1
        n_trainable += array.size
        n_modules += part == "lora_A"

    lines = [f"adapter: {path}"]
    if use_hira:
        lines.append(f"method: HiRA, r={r} (ΔW = W ⊙ (B·A), no scale)")
    elif use_mora:
        mora_type = raw.get("mora_type", 1)
        flavour = {1: "sharing", 6: "RoPE-based"}.get(mora_type, "ReMoRA cycle type")
        lines.append(f"method: MoRA, type {mora_type} ({flavour}), r={r}")
    else:
        alpha, rslora = raw.get("lora_alpha", 8), bool(raw.get("use_rslora"))
        scale = lora_scale(r, alpha, rslora)
        lines.append(f"method: LoRA, r={r}, alpha={alpha}, scale={scale:g}" + (" (rsLoRA)" if rslora else ""))
    lines.append(f"target_modules: {raw.get('target_modules')}")
    if use_hira:
        lines.append(f"hira_dropout: {raw.get('hira_dropout', 0.0)}")
    else:
        lines.append(f"lora_dropout: {raw.get('lora_dropout', 0.0)}")
    if raw.get("base_model_name_or_path"):
        lines.append(f"base_model_name_or_path: {raw['base_model_name_or_path']}")
    lines.append(f"adapted modules: {n_modules}")
    for kind, shapes in sorted(kinds.items()):
        if use_mora:
            parts = [f"r̂={shape[0]} ({count} x M {shape[0]}x{shape[1]})" for (_, shape), count in sorted(shapes.items())]
        else:
            a = {shape: c for (part, shape), c in shapes.items() if part == "lora_A"}
            b = {shape: c for (part, shape), c in shapes.items() if part == "lora_B"}
            parts = [f"{count} x in={shape[1]}" for shape, count in sorted(a.items())]
            parts += [f"out={shape[0]}" for shape in sorted(b)]
        lines.append(f"  {kind}: {', '.join(parts)}")
    lines.append(f"trainable parameters: {n_trainable:,}")
    return "\n".join(lines)


def info_command(args) -> int:
    print(describe_adapter(pathlib.Path(args.adapter)))
    return 0


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


def generate_command(args) -> int:
    from mora_jax.data import Tokenizer
    from mora_jax.generate import encode_prompts, generate
    from mora_jax.hf.checkpoints import load_llama, read_config
    from mora_jax.hf.peft import load_adapter
    from mora_jax.models.llama import abstract_params

    base = pathlib.Path(args.base)
    for what, directory in (("base model", base), ("adapter", args.adapter and pathlib.Path(args.adapter))):
        if directory and not directory.is_dir():
            raise UserError(f"{what} directory {directory} does not exist or is not a directory")
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    # Everything that can be checked without the weights is checked first.
    config = read_config(base)
    tokenizer = Tokenizer(args.tokenizer or base)
    tokenizer.check_fits(config.vocab_size, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         model=str(base))
    ids, mask = encode_prompts(tokenizer, args.prompt, chat=args.chat, system_prompt=args.system)
    limit = config.max_position_embeddings
    if ids.shape[1] + args.max_new_tokens > limit and (config.rope_scaling is None or
                                                       config.rope_scaling.rope_type != "dynamic"):
        raise UserError(f"the longest prompt has {ids.shape[1]} tokens; with --max-new-tokens {args.max_new_tokens} "
                        f"that exceeds the model's maximum length {limit}: shorten it or ask for fewer tokens")
    if args.adapter:
        load_adapter(args.adapter, abstract_params(config))  # shapes against the base, before the weights
    import jax

    from mora_jax.quant.config import QuantConfig
    from mora_jax.quant.transform import quantize

    quant = QuantConfig(format=args.quantize, block_size=args.block_size)
    jax.eval_shape(lambda p: quantize(p, quant), abstract_params(config))  # a block size that does not fit: now
    model, params = load_llama(base)
    adapters = load_adapter(args.adapter, params)[1] if args.adapter else None
    checked_weights(base, args.adapter, params, adapters, merged=False)  # what merge refuses, generate refuses
    params = quantize(params, quant)  # the projections stored quantized, dequantized matmul by matmul
    eos = set(config.eos_token_ids) | ({tokenizer.eos_id} if tokenizer.eos_id >= 0 else set())
    out = generate(model, params, ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, adapters=adapters,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=sorted(eos),
                   rng=jax.random.key(args.seed))
    for i, row in enumerate(jax.device_get(out).tolist()):
        stop = next((j for j, token in enumerate(row) if token in eos), len(row))
        text = tokenizer.decode(row[:stop])
        print(text if len(args.prompt) == 1 else f"[{i}] {text}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# convert-gguf
# ---------------------------------------------------------------------------------------------


def convert_gguf_command(args) -> int:
    from mora_jax.gguf.weights import convert_gguf

    out = pathlib.Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise UserError(f"{out} exists and is not an empty directory; choose a new one or pass --overwrite")
    print(f"converting {args.file} ...", file=sys.stderr, flush=True)
    convert_gguf(args.file, out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out} ({args.dtype})")
    return 0


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mora-jax", description="MoRA / LoRA adapters for Hugging Face LLaMA checkpoints (JAX)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge_parser = commands.add_parser(
        "merge", help="fold an adapter into a base model and write a Hugging Face checkpoint",
        description="Load a Hugging Face LLaMA checkpoint and a PEFT adapter (MoRA reference format or plain "
        "LoRA), merge K <- K + ΔK (float32 accumulate) and write the merged checkpoint.",
    )
    merge_parser.add_argument("--base", required=True, metavar="HF_DIR", help="base model directory (config.json + safetensors)")
    merge_parser.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="adapter_config.json + adapter_model.safetensors")
    merge_parser.add_argument("--out", required=True, metavar="OUT_DIR", help="directory for the merged model")
    merge_parser.add_argument("--dtype", choices=OUT_DTYPES, default=None, help="dtype of the written weights (default: the base's)")
    merge_parser.add_argument("--overwrite", action="store_true", help="replace the model files in a non-empty OUT_DIR")
    merge_parser.add_argument("--allow-pickle", action="store_true",
                              help="read a base that only has PyTorch pickle files (*.bin); only for files you trust")
    merge_parser.set_defaults(run=merge_command)

    info_parser = commands.add_parser("info", help="describe an adapter directory")
    info_parser.add_argument("adapter", metavar="ADAPTER_DIR")
    info_parser.set_defaults(run=info_command)

    gen_parser = commands.add_parser(
        "generate", help="continue prompts with a base model (and an adapter)",
        description="Generate text with a Hugging Face Llama / Mistral / Qwen2 checkpoint and optionally a PEFT "
        "adapter (applied unmerged), using the checkpoint's tokenizer (tokenizer.json or tokenizer.model).",
    )
    gen_parser.add_argument("--base", required=True, metavar="HF_DIR", help="base model directory (config.json + safetensors)")
    gen_parser.add_argument("--adapter", metavar="ADAPTER_DIR", help="adapter_config.json + adapter_model.safetensors")
    gen_parser.add_argument("--prompt", required=True, action="append", metavar="TEXT", help="a prompt (repeat for a batch)")
    gen_parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    gen_parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    gen_parser.add_argument("--system", metavar="TEXT", help="with --chat: a system message")
    gen_parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer file or directory (default: HF_DIR's)")
    gen_parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy")
    gen_parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    gen_parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    gen_parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    gen_parser.add_argument("--quantize", choices=("none", "int8", "int4", "nf4", "q8_0", "q4_0", "q4_1"),
                            default="none", help="store the base's projections quantized (weight-only: "
                            "docs/quantization.md); default none")
    gen_parser.add_argument("--block-size", type=int, default=64, metavar="N",
                            help="with --quantize int4 / nf4: input features per scale (default 64)")
    gen_parser.set_defaults(run=generate_command)

    gguf_parser = commands.add_parser(
        "convert-gguf", help="write a GGUF model as a Hugging Face directory",
        description="Read a GGUF file (llama.cpp's format; architectures llama, mistral and qwen2; float, Q8_0, "
        "Q4_0, Q4_1, Q5 and K-quant tensors) and write config.json, model.safetensors, tokenizer.json, "
        "tokenizer_config.json (with the chat template) and generation_config.json.",
    )
    gguf_parser.add_argument("file", metavar="FILE", help="the .gguf file")
    gguf_parser.add_argument("out_dir", metavar="OUT_DIR", help="directory for the Hugging Face model")
    gguf_parser.add_argument("--dtype", choices=GGUF_DTYPES, default="float32",
                             help="dtype of the written weights (default float32)")
    gguf_parser.add_argument("--overwrite", action="store_true", help="replace the model files in a non-empty OUT_DIR")
    gguf_parser.set_defaults(run=convert_gguf_command)
    return parser


def main(argv=None) -> int:
    """Run ``mora-jax``; returns the exit status (0 on success, 1 on a user error, 2 on bad usage)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # e.g. `mora-jax info DIR | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (UserError, OSError, ValueError) as e:
        # OSError covers missing files/directories and FileExistsError; ValueError covers
        # mora_jax's own validation (AdapterFormatError, config and shape checks).
        print(f"mora-jax: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mora-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
