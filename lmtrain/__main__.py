"""python -m lmtrain --help"""

from lmtrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
