"""Write Hugging Face PEFT's MetaMathQA benchmark splits as query/response JSON lines (configs/peft_metamathqa.py).

    python -m train.prepare_metamathqa --metamathqa MetaMathQA-395K.json \\
        --gsm8k-train gsm8k/main/train-00000-of-00001.parquet \\
        --gsm8k-test gsm8k/main/test-00000-of-00001.parquet --out data/peft

Inputs are local files (downloaded beforehand: meta-math/MetaMathQA and openai/gsm8k "main" on the
Hugging Face Hub): a JSON list, JSON lines or Parquet. Writes, under --out, metamathqa_train.jsonl
(the records within PEFT's 1,300-character limit), gsm8k_valid.jsonl (PEFT's 50 validation records)
and gsm8k_test.jsonl (the whole test split); an existing file is kept unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mora_jax.accuracy import read_records
from mora_jax.data.metamathqa import VALID_SIZE, gsm8k_records, valid_indices, within_char_limit

OUTPUTS = ("metamathqa_train.jsonl", "gsm8k_valid.jsonl", "gsm8k_test.jsonl")


def _read(path: str) -> list[dict]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".json"):
        with open(path) as f:
            records = json.load(f)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
        return records
    return read_records(path)


def _write(path: Path, records) -> int:
    count = 0
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.prepare_metamathqa", description=__doc__.splitlines()[0])
    parser.add_argument("--metamathqa", required=True, help="MetaMathQA records (query, response): .json, .jsonl, .parquet")
    parser.add_argument("--gsm8k-train", required=True, help="GSM8K main train split (question, answer)")
    parser.add_argument("--gsm8k-test", required=True, help="GSM8K main test split (question, answer)")
    parser.add_argument("--out", default="data/peft", help="directory to write the three JSON-lines files into")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    out = Path(args.out)
    existing = [str(out / name) for name in OUTPUTS if (out / name).exists()]
    if existing and not args.overwrite:
        parser.error(f"{', '.join(existing)} already exist(s); pass --overwrite to replace, or choose another --out")
    try:
        metamath = _read(args.metamathqa)
        gsm8k_train = gsm8k_records(_read(args.gsm8k_train))
        gsm8k_test = gsm8k_records(_read(args.gsm8k_test))
        train = list(within_char_limit(metamath))
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    out.mkdir(parents=True, exist_ok=True)
    kept = _write(out / OUTPUTS[0], train)
    _write(out / OUTPUTS[1], (gsm8k_train[i] for i in valid_indices(len(gsm8k_train))))
    _write(out / OUTPUTS[2], gsm8k_test)
    print(f"wrote {out / OUTPUTS[0]} ({kept} of {len(metamath)} MetaMathQA records, "
          f"{100 * kept / max(len(metamath), 1):.1f}%), {out / OUTPUTS[1]} "
          f"({min(len(gsm8k_train), VALID_SIZE)} GSM8K train records), {out / OUTPUTS[2]} ({len(gsm8k_test)})")


if __name__ == "__main__":
    main()
