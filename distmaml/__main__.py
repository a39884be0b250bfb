from distmaml.cli import main

raise SystemExit(main())
