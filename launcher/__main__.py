"""`lotus-train` / `python -m launcher`: the thin entry point."""

from launcher import cli
from launcher.distributed import own_the_process


def main() -> None:
    """The executable: a training run ends this process through
    ``launcher.distributed.exit_process`` (flushed, then ``os._exit``), one process or
    many, because threads that torch and its libraries leave behind can abort
    interpreter shutdown after a run has written everything ('terminate called without
    an active exception', seen once in CI after a one-process run)."""
    own_the_process()
    cli.main()


if __name__ == "__main__":
    main()
