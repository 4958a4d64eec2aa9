"""The server's request error (the HTTP layer turns it into a JSON answer with its status)."""


class RequestError(ValueError):
    """A request the backend cannot serve because of its content; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
