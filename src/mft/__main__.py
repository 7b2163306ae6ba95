from mft.cli import main

raise SystemExit(main())
