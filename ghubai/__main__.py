import sys

from ghubai.cli import main

sys.exit(main())
