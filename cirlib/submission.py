"""`python -m cirlib.submission FILE... --captions cap.rc2.test1.json --split split.rc2.test1.json`: check CIRR
submission files before uploading them. The code lives in `cirlib.eval.submission`."""
from cirlib.eval.submission import main

if __name__ == "__main__":
    raise SystemExit(main())
