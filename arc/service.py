"""Shared bits of the twistd plugins: options and listening with TLS."""

from twisted.application import internet
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.python.failure import Failure
from twisted.python import usage

from arc.errors import ConfigError
from arc.tlssocket import TLSServerFactory


class ConfigOptions(usage.Options):
    """``--config FILE``: every part is configured by one YAML file.

    The file is loaded and checked here, so that twistd stops with one line
    naming the file, the key and the reason before anything starts.
    """

    optParameters = [["config", "c", None, "YAML configuration file"]]
    loader = None

    def postOptions(self):
        if not self["config"]:
            raise usage.UsageError("--config FILE is required (see etc/ for commented examples)")
        try:
            self["parsed"] = type(self).loader(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def parsed_config(options, loader):
    """The checked configuration from ``options`` (Options or a plain dict)."""
    parsed = options.get("parsed")
    return parsed if parsed is not None else loader(options["config"])


def listen_service(reactor, endpoint, factory, tls_options=None, *, file=None, key="listen"):
    """A StreamServerEndpointService for ``endpoint``, TLS-wrapped if asked."""
    try:
        server = serverFromString(reactor, endpoint)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError("not a usable Twisted endpoint string %r: %s" % (endpoint, e),
                          file=file, key=key) from None
    if tls_options is not None:
        factory = TLSServerFactory(tls_options, factory)
    service = internet.StreamServerEndpointService(server, factory)
    # A port that cannot be bound stops start-up instead of being logged only.
    service._raiseSynchronously = True
    return service


def bound_port(service):
    """Deferred firing with the IListeningPort of a started endpoint service.

    Unlike yielding ``_waitingForPort`` itself, this leaves its result in
    place for every other caller.
    """
    d = defer.Deferred()

    def passed(result):
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)
        return result

    service._waitingForPort.addBoth(passed)
    return d
