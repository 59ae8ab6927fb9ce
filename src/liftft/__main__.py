import sys

from liftft.cli import main

sys.exit(main())
