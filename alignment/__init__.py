"""Core library of quark-alt: records, models, control tokens, quantiles, losses, the loop.

Nothing here parses command lines or knows a concrete reward model; `experiments/` wires it up.
"""

import logging


class _NoOptionalKernelNotice(logging.Filter):
    """Drop bitsandbytes' notice that the optional `kernels` package is missing.

    transformers imports peft, which imports bitsandbytes, whose CPU backend logs this warning
    at import on every CPU with AVX512-BF16, i.e. on every `train` here, although nothing of
    ours quantizes to 4 bit. Only that one notice is dropped; its other messages still show.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")
            and "No module named 'kernels'" in record.getMessage()
        )


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoOptionalKernelNotice())
