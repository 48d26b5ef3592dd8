"""`python -m cirlib.verify_original DIR`: kept so that documented commands keep working. The code lives in `cirlib.tools.verify_original`."""
from cirlib.tools.verify_original import main

if __name__ == "__main__":
    raise SystemExit(main())
