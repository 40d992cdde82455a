"""What a run prints: hilum's own lines, and the libraries' only when they warn.

A user watching a run wants the step lines, the evaluations and the summary. Ray, Ray Train and
DeepSpeed log their INFO lines through the same root logger (Ray Train even routes a worker's
``print`` there, and logs every ``ray.train.report`` with the whole metrics dict), so the root
logger stays at WARNING and only the ``hilum`` loggers speak at INFO. ``hilum … --verbose`` sets
``HILUM_VERBOSE=1``, which the launchers pass on to every worker: then everything is shown,
hilum's per-epoch bookkeeping included (DEBUG).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from typing import Iterator

VERBOSE_ENV = "HILUM_VERBOSE"
DATE_FORMAT = "%H:%M:%S"

# Messages that a library emits at WARNING on every run and that say nothing about this one.
_KNOWN_NOISE = {
    # DeepSpeed's WarmupCosineLR asks itself for the learning rate in its own constructor, before
    # step 0, and warns about that (DeepSpeed 0.16-0.19).
    "DeepSpeed": ("Attempting to get learning rate from scheduler before it has started",),
}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """Ask this process and every worker it starts for the libraries' INFO lines."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def configure_console(fmt: str, show_info: bool = True) -> None:
    """Set up this process's logging: hilum at INFO (``show_info``; WARNING on the ranks that
    leave the talking to rank 0), everything else at WARNING, unless verbose."""
    loud = verbose()
    logging.basicConfig(level=logging.INFO if loud else logging.WARNING, format=fmt, datefmt=DATE_FORMAT, force=True)
    logging.getLogger("hilum").setLevel(logging.DEBUG if loud else logging.INFO if show_info else logging.WARNING)
    if loud:
        return
    # DeepSpeed's logger has its own handler and level (INFO), and does not propagate.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    for name, fragments in _KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
    # DeepSpeed's ZeRO gathers call a collective that torch 2.14 deprecates: one FutureWarning per
    # rank, about DeepSpeed's code, not the user's.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    torch = sys.modules.get("torch")  # a worker has it; the command line need not import it for this
    if torch is not None and not torch.cuda.is_available():
        # Printed when DeepSpeed's op builder imports torch's extension builder on a machine
        # without CUDA, where no CUDA op is ever built.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


@contextlib.contextmanager
def printed_to_log(logger: logging.Logger, level: int = logging.DEBUG) -> Iterator[None]:
    """Send what a library ``print``s meanwhile to ``logger``: DeepSpeed prints a line from every
    rank at each start ("deepspeed_shm_comm_op built successfully"); --verbose shows it."""
    printed, failed = io.StringIO(), False
    try:
        with contextlib.redirect_stdout(printed):
            yield
    except BaseException:
        failed = True  # what it printed before failing may say why: shown, at WARNING
        raise
    finally:
        for line in printed.getvalue().splitlines():
            if line.strip():
                logger.log(logging.WARNING if failed else level, "%s", line)
