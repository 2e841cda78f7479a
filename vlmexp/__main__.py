from vlmexp.cli import main

raise SystemExit(main())
