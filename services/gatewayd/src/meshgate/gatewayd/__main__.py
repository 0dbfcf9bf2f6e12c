"""``python -m meshgate.gatewayd``: the same as the ``gatewayd`` console script."""

from meshgate.gatewayd.main import main

raise SystemExit(main())
