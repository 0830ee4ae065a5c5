"""`python3 -m localcluster up|down|status|kubeconfig|volume` (hack/cluster on PYTHONPATH)."""

import sys

from localcluster.cluster import main

sys.exit(main())
