from diffucode.cli import main

raise SystemExit(main())
