"""Tests for arc.guard.requestinfo: requests read as kube-apiserver reads them."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from arc.guard.requestinfo import RequestInfo, request_info

FUZZ = settings(max_examples=500, deadline=None)


def resource(verb, group="", version="v1", namespace="", res="", sub="", name="", path=""):
    return RequestInfo(True, verb, group, version, namespace, res, sub, name, path)


class ResourceRequestTests(unittest.TestCase):
    def check(self, method, target, expected):
        self.assertEqual(request_info(method, target), expected)

    def test_core_namespaced_object(self):
        self.check("GET", "/api/v1/namespaces/dev/pods/web-1",
                   resource("get", namespace="dev", res="pods", name="web-1",
                            path="/api/v1/namespaces/dev/pods/web-1"))

    def test_group_cluster_scoped_object(self):
        self.check("PUT", "/apis/rbac.authorization.k8s.io/v1/clusterroles/admin",
                   resource("update", "rbac.authorization.k8s.io", res="clusterroles",
                            name="admin",
                            path="/apis/rbac.authorization.k8s.io/v1/clusterroles/admin"))

    def test_methods_to_verbs(self):
        target = "/apis/apps/v1/namespaces/dev/deployments/web"
        for method, verb in [("GET", "get"), ("HEAD", "get"), ("POST", "create"),
                             ("PUT", "update"), ("PATCH", "patch"), ("DELETE", "delete"),
                             ("OPTIONS", ""), ("get", "")]:
            info = request_info(method, target)
            self.assertEqual((info.verb, info.name, info.resource), (verb, "web", "deployments"))

    def test_collections(self):
        self.assertEqual(request_info("GET", "/api/v1/namespaces/dev/pods").verb, "list")
        self.assertEqual(request_info("HEAD", "/api/v1/pods").verb, "list")
        self.assertEqual(request_info("POST", "/api/v1/namespaces/dev/pods").verb, "create")
        info = request_info("DELETE", "/apis/batch/v1/namespaces/dev/jobs?labelSelector=a%3Db")
        self.assertEqual((info.verb, info.namespace, info.resource, info.name),
                         ("deletecollection", "dev", "jobs", ""))

    def test_all_namespaces(self):
        self.check("GET", "/apis/apps/v1/deployments",
                   resource("list", "apps", res="deployments", path="/apis/apps/v1/deployments"))

    def test_watch_parameter(self):
        for query, verb in [("watch=true", "watch"), ("watch=1", "watch"),
                            ("watch=True", "watch"), ("watch", "watch"), ("watch=", "watch"),
                            ("watch=false", "list"), ("watch=FALSE", "list"),
                            ("watch=0", "list"), ("", "list"), ("watchy=1", "list"),
                            ("resourceVersion=5&watch=1&watch=0", "watch"),
                            ("watch=0&watch=1", "list")]:
            info = request_info("GET", "/api/v1/namespaces/dev/pods?" + query)
            self.assertEqual(info.verb, verb, query)

    def test_watch_of_a_named_object_is_a_get(self):
        info = request_info("GET", "/api/v1/namespaces/dev/pods/web?watch=1")
        self.assertEqual((info.verb, info.name), ("get", "web"))

    def test_watch_path_prefix(self):
        self.check("GET", "/api/v1/watch/namespaces/dev/pods",
                   resource("watch", namespace="dev", res="pods",
                            path="/api/v1/watch/namespaces/dev/pods"))
        info = request_info("GET", "/apis/apps/v1/watch/namespaces/dev/deployments/web")
        self.assertEqual((info.verb, info.api_group, info.resource, info.name),
                         ("watch", "apps", "deployments", "web"))

    def test_field_selector_names_the_object(self):
        base = "/api/v1/namespaces/dev/pods?"
        for query, verb, name in [
                ("fieldSelector=metadata.name%3Dweb&watch=1", "watch", "web"),
                ("fieldSelector=metadata.name%3D%3Dweb", "list", "web"),
                ("fieldSelector=status.phase%3DRunning,metadata.name%3Dweb", "list", "web"),
                ("fieldSelector=metadata.name%21%3Dweb", "list", ""),
                ("fieldSelector=metadata.name%3Da%5C%2Cb", "list", "a,b"),
                ("fieldSelector=metadata.name%3Da%2Fb", "list", ""),
                ("fieldSelector=metadata.name%3D..", "list", ""),
                ("fieldSelector=metadata.name%3Da%5Cb", "list", ""),
                ("fieldSelector=metadata.name%3Da%3Db", "list", ""),
                ("fieldSelector=metadata.name%3Dweb,bogus", "list", ""),
                ("fieldSelector=", "list", "")]:
            info = request_info("GET", base + query)
            self.assertEqual((info.verb, info.name), (verb, name), query)
        info = request_info("GET", "/api/v1/watch/namespaces/dev/pods?"
                                   "fieldSelector=metadata.name%3Dweb")
        self.assertEqual((info.verb, info.name), ("watch", ""))

    def test_subresources(self):
        info = request_info("GET", "/api/v1/namespaces/dev/pods/web/log?follow=true")
        self.assertEqual((info.verb, info.resource, info.name, info.subresource),
                         ("get", "pods", "web", "log"))
        info = request_info("PATCH", "/apis/apps/v1/namespaces/dev/deployments/web/scale")
        self.assertEqual((info.verb, info.subresource), ("patch", "scale"))
        info = request_info("GET", "/api/v1/namespaces/dev/services/web/proxy/metrics/x")
        self.assertEqual((info.verb, info.name, info.subresource), ("get", "web", "proxy"))

    def test_connect_subresources_keep_the_method_verb(self):
        spdy = request_info("POST", "/api/v1/namespaces/dev/pods/web/exec?command=sh&stdin=1")
        self.assertEqual((spdy.verb, spdy.subresource, spdy.is_connect), ("create", "exec", True))
        ws = request_info("GET", "/api/v1/namespaces/dev/pods/web/exec?command=sh")
        self.assertEqual((ws.verb, ws.is_connect), ("get", True))
        for sub in ("attach", "portforward"):
            self.assertTrue(request_info("POST", "/api/v1/namespaces/dev/pods/web/" + sub)
                            .is_connect)
        self.assertFalse(request_info("GET", "/api/v1/namespaces/dev/pods/web/log").is_connect)
        self.assertFalse(request_info("POST", "/apis/x.io/v1/namespaces/dev/pods/web/exec")
                         .is_connect)
        self.assertFalse(request_info("GET", "/exec").is_connect)

    def test_proxy_path_prefix_has_no_subresource(self):
        info = request_info("GET", "/api/v1/proxy/namespaces/dev/pods/web/metrics")
        self.assertEqual((info.verb, info.namespace, info.resource, info.name, info.subresource),
                         ("proxy", "dev", "pods", "web", ""))

    def test_namespace_object(self):
        self.check("GET", "/api/v1/namespaces/dev",
                   resource("get", namespace="dev", res="namespaces", name="dev",
                            path="/api/v1/namespaces/dev"))
        self.check("PUT", "/api/v1/namespaces/dev/finalize",
                   resource("update", namespace="dev", res="namespaces", name="dev",
                            sub="finalize", path="/api/v1/namespaces/dev/finalize"))
        info = request_info("GET", "/api/v1/namespaces/dev/status")
        self.assertEqual((info.resource, info.name, info.subresource),
                         ("namespaces", "dev", "status"))
        info = request_info("GET", "/api/v1/namespaces")
        self.assertEqual((info.verb, info.resource, info.namespace), ("list", "namespaces", ""))
        info = request_info("DELETE", "/api/v1/namespaces/dev")
        self.assertEqual((info.verb, info.name), ("delete", "dev"))

    def test_percent_encoding_is_decoded_before_splitting(self):
        info = request_info("GET", "/api/v1/namespaces/d%65v/configmaps/caf%C3%A9")
        self.assertEqual((info.namespace, info.name), ("dev", "café"))
        self.assertEqual(info.path, "/api/v1/namespaces/dev/configmaps/café")
        info = request_info("GET", "/api/v1/namespaces/dev/configmaps/a%2Fb")
        self.assertEqual((info.name, info.subresource), ("a", "b"))
        self.assertEqual(request_info("GET", "/api/v1/namespaces/x/pods/%ff").name, "\ufffd")

    def test_bytes_and_absolute_form(self):
        expected = request_info("GET", "/api/v1/namespaces/dev/pods/web")
        self.assertEqual(request_info(b"GET", b"/api/v1/namespaces/dev/pods/web"), expected)
        self.assertEqual(request_info("GET", "https://k8s.example:6443/api/v1/namespaces/dev/"
                                             "pods/web"), expected)
        self.assertEqual(request_info("GET", "HTTP://k8s/api/v1/namespaces/dev/pods/web"),
                         expected)

    def test_trailing_and_doubled_slashes(self):
        info = request_info("GET", "/api/v1/namespaces/dev/pods/")
        self.assertEqual((info.verb, info.resource, info.name), ("list", "pods", ""))
        info = request_info("GET", "/api/v1/namespaces//pods")
        self.assertEqual((info.verb, info.namespace, info.resource), ("list", "", "pods"))


class NonResourceRequestTests(unittest.TestCase):
    def test_discovery_and_health(self):
        for method, target in [("GET", "/version"), ("GET", "/healthz"), ("GET", "/api"),
                               ("GET", "/api/v1"), ("GET", "/apis"), ("GET", "/apis/apps"),
                               ("GET", "/apis/apps/v1"), ("GET", "/openapi/v2?timeout=32s"),
                               ("POST", "/apis/authorization.k8s.io"), ("GET", "/"),
                               ("HEAD", "/livez/etcd")]:
            info = request_info(method, target)
            self.assertEqual(info, RequestInfo(False, method.lower(),
                                               path=target.partition("?")[0]))

    def test_garbage(self):
        for target in ["", "*", "api/v1/pods", "ftp://x/api/v1/pods", "https://x",
                       "/api/v1/watch", "/api/v1/proxy/", "/%", "/api/v1/pods%zz",
                       "?watch=1", "/apis/x/v1/pods?fieldSelector=%5C"]:
            info = request_info("GET", target)
            self.assertIsInstance(info, RequestInfo)
        self.assertFalse(request_info("GET", "api/v1/pods").is_resource_request)
        self.assertFalse(request_info("GET", "/api/v1/watch").is_resource_request)
        self.assertFalse(request_info("GET", "https://x").is_resource_request)
        self.assertEqual(request_info("GET", "https://x").path, "/")
        self.assertEqual(request_info("GET", "/api/v1/pods%zz").resource, "pods%zz")

    @FUZZ
    @given(st.sampled_from(["GET", "POST", "DELETE", "BREW", ""]),
           st.lists(st.sampled_from(["/", "api", "apis", "v1", "namespaces", "watch", "proxy",
                                     "status", "pods", "exec", "?", "&", "=", "%", "%2F",
                                     "watch=", "fieldSelector=", "metadata.name", "\\", ",",
                                     "!", "é", "x"]), max_size=14).map("".join))
    def test_never_raises(self, method, target):
        info = request_info(method, target)
        self.assertEqual(request_info(method.encode(), target.encode("utf-8")).verb, info.verb)
        if not info.is_resource_request:
            self.assertEqual(info.verb, method.lower())
