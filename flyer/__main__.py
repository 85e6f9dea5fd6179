import sys

from flyer.cli import main

sys.exit(main())
