"""`python -m cirlib.hub export|verify ...`: Hub-ready model folders with checkable cards.
The code lives in `cirlib.run.hub` and `cirlib.workbook.hub`."""
from cirlib.run.hub import main

if __name__ == "__main__":
    raise SystemExit(main())
