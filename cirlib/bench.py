"""`python -m cirlib.bench`: the stage-II benchmark; kept so that documented commands keep working. The code lives in `cirlib.tools.bench`."""
from cirlib.tools.bench import main

if __name__ == "__main__":
    main()
