"""One exception type per kind of user error. Each message is one line that names the fix;
the CLI and the chat app print it as it is."""


class GemmaError(Exception):
    """Base of every error a user can cause and fix."""


class ModelNotFound(GemmaError):
    """The model name, repo or path does not lead to a model."""


class BadCheckpoint(GemmaError):
    """The files are there but are not a usable Gemma 3 checkpoint."""


class BadImage(GemmaError):
    """An image that cannot be read, or that the model cannot take."""


class ContextOverflow(GemmaError):
    """The input does not fit in the context window."""


class BadRequest(GemmaError):
    """An option or argument out of range (empty prompt, max_tokens <= 0, ...)."""


class ServerNotFound(GemmaError):
    """No gemma-mlx (or Ollama-compatible) server answers where a command looked for one."""


class BadSplit(GemmaError):
    """The model cannot be split across the ranks as asked (tensor or pipeline parallel)."""


class RankUnavailable(GemmaError):
    """A rank of a distributed run did not join in time, stopped, or cannot be reached."""
