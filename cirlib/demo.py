"""`python -m cirlib.demo`: make demo; kept so that users' scripts keep working. The code lives in `cirlib.run.demo`."""
from cirlib.run.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
