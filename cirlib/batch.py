"""`python -m cirlib.batch`: run the numbered notebooks with papermill; kept so that users' scripts keep working. The code lives in `cirlib.run.batch`."""
from cirlib.run.batch import main

if __name__ == "__main__":
    raise SystemExit(main())
