"""The base of every error fastgpt reports to a user as one line (the CLI prints it, exit 2)."""


class FastGPTError(Exception):
    """Bad input or state that the user can fix; the message names the file, line or field."""


class TokenizerError(FastGPTError, ValueError):
    """Bad tokenizer input, file or chat template (one-line message)."""
