"""Kubernetes ``Status`` answers of the API server emulator.

Every failure the emulator reports is a :class:`StatusError`; the HTTP layer
turns it into the ``Status`` JSON body and response code kubectl expects, so
that kubectl prints the same ``Error from server (Reason): message`` lines a
real cluster would cause.
"""


class StatusError(Exception):
    """A failed API request, rendered as a ``v1`` ``Status`` object."""

    def __init__(self, code, reason, message, details=None):
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        super().__init__(message)

    def status(self):
        """The ``Status`` object for the response body."""
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def unauthorized():
    """No credentials, or credentials the server does not know."""
    return StatusError(401, "Unauthorized", "Unauthorized")


def forbidden(message, name="", kind="", group=""):
    """The caller is known but may not do this."""
    details = {"name": name, "kind": kind}
    if group:
        details["group"] = group
    return StatusError(403, "Forbidden", message, details)


def badRequest(message):
    """The request cannot be understood as sent."""
    return StatusError(400, "BadRequest", message)


def notFound(resource, name, group=""):
    """The named object does not exist."""
    qualified = f"{resource}.{group}" if group else resource
    details = {"name": name, "kind": resource}
    if group:
        details["group"] = group
    return StatusError(404, "NotFound", f'{qualified} "{name}" not found', details)


def pathNotFound():
    """No such endpoint: the answer kubectl maps to "resource not found"."""
    return StatusError(404, "NotFound", "the server could not find the requested resource")


def alreadyExists(resource, name):
    """Creating an object whose name is taken."""
    return StatusError(
        409,
        "AlreadyExists",
        f'{resource} "{name}" already exists',
        {"name": name, "kind": resource},
    )


def conflict(resource, name, message):
    """An update based on a stale ``resourceVersion``."""
    return StatusError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource} "{name}": {message}',
        {"name": name, "kind": resource},
    )


def invalid(kind, name, message):
    """An object that fails validation."""
    return StatusError(
        422,
        "Invalid",
        f'{kind} "{name}" is invalid: {message}',
        {"name": name, "kind": kind},
    )


def methodNotAllowed():
    """A verb the endpoint does not support."""
    return StatusError(
        405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
    )


def unsupportedMediaType(contentType):
    """A request body in an encoding the emulator cannot read."""
    return StatusError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media types include: "
        f'application/json, application/yaml; the emulator cannot read "{contentType}" '
        f"(kubectl sends protobuf for `kubectl create <kind> NAME`: use `kubectl apply -f` "
        f"with a manifest instead)",
    )
