"""``DataError``: data the user pointed at cannot be used (no files, unreadable text, too small a
corpus, a tokenizer that cannot be trained or loaded, a bad prompts file). The message names the
problem and the fix; the CLI prints it without a traceback."""


class DataError(ValueError):
    pass
