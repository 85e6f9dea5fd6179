import sys

from flyer.cli import main

if __name__ == "__main__":
    sys.exit(main())
