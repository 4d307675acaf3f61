"""`lotus-train` / `python -m launcher`: the thin entry point."""

from launcher.cli import main

if __name__ == "__main__":
    main()
