"""Write a deterministic pseudo-English corpus (no downloads), one document per line.

    python -m train.make_corpus --out data/corpus.txt --lines 20000 --seed 0
    python -m train.make_corpus --out data/math_train.jsonl --lines 2000 --kind math   # fine-tuning records

The text comes from a built-in grammar and word list (see ``mora_jax.data.synthetic_corpus_lines``),
so the same ``--lines`` and ``--seed`` always give the same file: enough to train a tokenizer and run
the pretraining pipeline offline.
"""

from __future__ import annotations

import argparse

from mora_jax.data import write_synthetic_corpus, write_synthetic_math


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.make_corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="text file to write, e.g. data/corpus.txt")
    parser.add_argument("--lines", type=int, default=20000, help="number of documents (lines)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same corpus")
    parser.add_argument("--kind", choices=("text", "math"), default="text",
                        help="text: pretraining documents; math: MetaMathQA-style query/response JSON lines")
    args = parser.parse_args(argv)
    if args.lines < 1:
        parser.error("--lines must be positive")
    write = write_synthetic_corpus if args.kind == "text" else write_synthetic_math
    count = write(args.out, args.lines, seed=args.seed)
    print(f"wrote {count} lines to {args.out}")


if __name__ == "__main__":
    main()
