"""`python -m cirlib.search index|query ...`: a gallery index of any folder of images, searched with both stages.
The code lives in `cirlib.run.search` and `cirlib.workbook.search`."""
from cirlib.run.search import main

if __name__ == "__main__":
    raise SystemExit(main())
