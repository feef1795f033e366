from repvgg.cli import main

raise SystemExit(main())
