"""torchrun for start.sh: the same launcher and flags, but a run that fails or is stopped by a signal ends with its
own processes' last line and exit status, not the launcher's traceback and failure report."""
import logging
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


def main(argv: list[str]) -> int:
    """Launch as `torchrun argv` does; the exit status of the first process that failed, 128 + N for signal N."""
    # the launcher's warnings and per-process failure report repeat, in 30 lines, what rank 0 said in one
    for name in [name for name in logging.root.manager.loggerDict if name.startswith('torch.distributed')]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # each has its own level: the parent's does not reach it
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as failure:
        code = failure.get_first_failure()[1].exitcode  # -N: killed by signal N, reported as a shell would
        return 128 - code if code < 0 else code or 1
    except SignalException as stop:  # each process got the signal too, and said where it stopped
        return 128 + int(stop.sigval)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
