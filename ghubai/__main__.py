import sys

from ghubai.launch import main

sys.exit(main())
