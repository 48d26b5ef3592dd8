"""`python -m cirlib.launch`: run pipeline steps on one process or many; kept so that users' scripts keep working. The code lives in `cirlib.run.launch`."""
from cirlib.run.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
