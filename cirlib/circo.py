"""`python -m cirlib.circo evaluate|validate ...`: CIRCO metrics and test-server checks. The code lives in
`cirlib.eval.circo`."""
from cirlib.eval.circo import main

if __name__ == "__main__":
    raise SystemExit(main())
