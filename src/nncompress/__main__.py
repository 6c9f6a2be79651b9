from nncompress.cli import main

raise SystemExit(main())
