"""The client daemon's control endpoint (a unix socket): ``GET /status``.

``arc status`` and ``arc connect`` read it to show health and to wait until
a newly started daemon's tunnel is up.
"""

import json

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site


class _Status(Resource):
    isLeaf = True

    def __init__(self, proxy):
        super().__init__()
        self.proxy = proxy

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.proxy.status()).encode()


class _Reload(Resource):
    isLeaf = True

    def __init__(self, proxy):
        super().__init__()
        self.proxy = proxy

    def render_POST(self, request):
        d = self.proxy.reload()
        d.addBoth(lambda _: (request.write(json.dumps(self.proxy.status()).encode()),
                             request.finish()))
        return NOT_DONE_YET


def control_factory(proxy):
    root = Resource()
    root.putChild(b"status", _Status(proxy))
    root.putChild(b"reload", _Reload(proxy))
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
