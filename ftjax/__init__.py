"""ftjax: fine-tuning transfer between LLM versions, in JAX."""

__version__ = "0.1.0"

from ftjax.errors import FtjaxError
