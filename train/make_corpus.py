"""Write a corpus, one document per line: deterministic pseudo-English (no downloads), or real prose.

    python -m train.make_corpus --out data/corpus.txt --lines 20000 --seed 0
    python -m train.make_corpus --out data/math_train.jsonl --lines 2000 --kind math   # fine-tuning records
    # real English prose: the Python documentation's sources from Debian's python3.11-doc
    python -m train.make_corpus --from-rst /usr/share/doc/python3.11/html/_sources \
        --out data/pyprose/train.txt --eval-out data/pyprose/eval.txt

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
    parser.add_argument("--from-rst", metavar="DIR", default="",
                        help="write the prose paragraphs of the reStructuredText files under DIR instead "
                             "(mora_jax.experiments.prose); needs --eval-out")
    parser.add_argument("--eval-out", default="", help="with --from-rst: the held-out file (2%% of paragraphs)")
    args = parser.parse_args(argv)
    if args.from_rst:
        from mora_jax.experiments.prose import write_prose_corpus

        if not args.eval_out:
            parser.error("--from-rst needs --eval-out (the held-out split)")
        try:
            n_train, n_eval = write_prose_corpus(args.from_rst, args.out, args.eval_out)
        except FileNotFoundError as e:
            parser.error(str(e))
        print(f"wrote {n_train} paragraphs to {args.out} and {n_eval} to {args.eval_out}")
        return
    if args.lines < 1:
        parser.error("--lines must be positive")
    write = write_synthetic_corpus if args.kind == "text" else write_synthetic_math
    count = write(args.out, args.lines, seed=args.seed)
    print(f"wrote {count} lines to {args.out}")


if __name__ == "__main__":
    main()
