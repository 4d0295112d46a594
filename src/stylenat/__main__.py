from stylenat.cli import main

raise SystemExit(main())
