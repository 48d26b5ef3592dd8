"""`python -m cirlib.rerank --candidates FILE --stage2 RUN ...`: re-rank another system's candidates with a stage-II
run. The code lives in `cirlib.run.rerank` and `cirlib.workbook.rerank_any`."""
from cirlib.run.rerank import main

if __name__ == "__main__":
    raise SystemExit(main())
