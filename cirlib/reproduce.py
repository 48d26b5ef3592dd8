"""`python -m cirlib.reproduce RUN_FOLDER [--write PATH]`: the commit, YAML parameters and exact command that make a
run folder again. The code lives in `cirlib.run.reproduce`."""
from cirlib.run.reproduce import main

if __name__ == "__main__":
    raise SystemExit(main())
