"""Train a SentencePiece tokenizer on a local corpus (or any data source) and write ``OUT.model``.

    python -m train.train_tokenizer --input corpus.txt --vocab-size 512 --out tok

``--input`` is a text/JSON-lines/Parquet file, directory or glob, or ``c4`` (streamed from the Hub,
use ``--max-sentences``). Training is deterministic: the same input and options give the same
``tok.model`` (ids: unk 0, bos 1, eos 2, pad 3; byte fallback; see ``mora_jax.data.train_tokenizer``).
"""

from __future__ import annotations

import argparse

from mora_jax.data import train_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.train_tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="corpus file, directory or glob (.txt/.jsonl/.parquet), or 'c4'")
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (soft limit), e.g. 512")
    parser.add_argument("--out", required=True, help="output prefix: writes OUT.model and OUT.vocab")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--text-field", default="text", help="text column of JSON/Parquet records")
    parser.add_argument("--max-sentences", type=int, default=2_000_000, help="train on the first N non-empty lines")
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument("--no-byte-fallback", action="store_true", help="no byte pieces (allows vocab < ~300)")
    parser.add_argument("--threads", type=int, default=1, help="more threads are faster but may change the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")
    args = parser.parse_args(argv)
    tokenizer = train_tokenizer(
        args.input,
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        text_field=args.text_field,
        max_sentences=args.max_sentences,
        byte_fallback=not args.no_byte_fallback,
        character_coverage=args.character_coverage,
        num_threads=args.threads,
        seed=args.seed,
        verbose=args.verbose,
    )
    print(f"wrote {tokenizer.model_file} ({tokenizer.vocab_size} pieces)")


if __name__ == "__main__":
    main()
