"""The ``basicsr`` logger, re-targetable: each pipeline run logs to its own file (also several runs in one process)."""
from __future__ import annotations

import logging

LOG_FORMAT = '%(asctime)s %(levelname)s: %(message)s'


def setup_logger(log_file: str | None, rank: int = 0) -> logging.Logger:
    """Console + file logging for the ``basicsr`` logger that basicsr's modules and ours write to.

    Replaces the handlers of an earlier run. Ranks other than 0 only log errors.
    """
    logger = logging.getLogger('basicsr')
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    formatter = logging.Formatter(LOG_FORMAT)
    console = logging.StreamHandler()
    console.setFormatter(formatter)
    logger.addHandler(console)
    if log_file is not None and rank == 0:
        # append: two runs started within the same second share a log name, and neither log may be lost
        file_handler = logging.FileHandler(log_file, 'a')
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    # basicsr's get_root_logger() would otherwise add its own handler on first use and print everything twice.
    from basicsr.utils import logger as basicsr_logger
    basicsr_logger.initialized_logger['basicsr'] = True
    return logger
