"""`python -m cirlib.data check --dataset cirr|fashioniq ROOT`: check a downloaded dataset folder (cirlib.data.check)."""
import sys

from cirlib.data.check import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] != "check":
        print("usage: python -m cirlib.data check --dataset cirr|fashioniq ROOT [--workers N] [--problems-file F]",
              file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(argv[1:]))
