from neoplasma.core.cli import main

raise SystemExit(main())
