"""`python -m cirlib.synth`: generate the synthetic CIR world; kept so that users' scripts keep working. The code lives in `cirlib.data.synth`."""
from cirlib.data.synth import main

if __name__ == "__main__":
    raise SystemExit(main())
