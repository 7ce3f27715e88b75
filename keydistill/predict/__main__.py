import sys

from keydistill.predict.cli import main

sys.exit(main())
