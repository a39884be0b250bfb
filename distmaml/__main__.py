from distmaml.commands.cli import main

raise SystemExit(main())
