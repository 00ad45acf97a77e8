"""Entry point: word-relation questions (antonyms, hypernyms) from WordNet, as JSON lines for the
fine-tuning comparison's ``word_relations`` experiment (mora_jax/experiments/wordnet.py).

    apt-get install -y wordnet-base
    python -m train.make_word_relations --out data/word_relations.jsonl
    python -m train.make_word_relations --sample 24 --out tests/fixtures/word_relations_sample.jsonl  # the tests' sample
"""

import argparse
import collections

from mora_jax.experiments import wordnet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wordnet", default="/usr/share/wordnet", help="WordNet 3.0 database folder (wordnet-base)")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--sample", type=int, default=0,
                        help="keep only the first N questions of each relation and split (by a hash of the word)")
    args = parser.parse_args(argv)
    try:
        records = wordnet.relation_records(args.wordnet)
    except FileNotFoundError as e:
        parser.exit(2, f"error: {e}\n")
    if args.sample:
        kept, seen = [], collections.Counter()
        for record in sorted(records, key=lambda r: wordnet.word_hash(r["word"])):
            key = (record["relation"], record["split"])
            if seen[key] < args.sample:
                seen[key] += 1
                kept.append(record)
        records = sorted(kept, key=lambda r: (r["relation"], r["word"]))
    n = wordnet.write_records(records, args.out)
    counts = collections.Counter((r["relation"], r["split"]) for r in records)
    print(f"{n} questions written to {args.out}: "
          + ", ".join(f"{rel} {split} {c}" for (rel, split), c in sorted(counts.items())))


if __name__ == "__main__":
    main()
