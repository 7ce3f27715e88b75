import sys

from keydistill.train.job import main

sys.exit(main())
