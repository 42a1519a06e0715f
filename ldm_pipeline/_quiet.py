"""Notices from the libraries underneath that name nothing a user of this package can act on.

Imported first by the package, so that the filter is in place before diffusers is imported.
"""

import logging


def _no_torchvision_notice(record: logging.LogRecord) -> bool:
    # transformers warns, on diffusers' import of CLIPImageProcessor, that torchvision is missing
    # and that it falls back to the PIL processor. This package does not use torchvision (PyPI's
    # does not import beside the CPU torch), so the notice is noise on every `ldm` command.
    return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_no_torchvision_notice)
