import sys

from keydistill.export.cli import main

sys.exit(main())
