from neoplasma.cli import main

raise SystemExit(main())
