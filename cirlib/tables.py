"""`python -m cirlib.tables OUTPUTS_ROOT [--out DIR] [--format md|latex|csv|all]`: the paper's tables from the runs
under an outputs root. The code lives in `cirlib.run.tables`."""
from cirlib.run.tables import main

if __name__ == "__main__":
    raise SystemExit(main())
