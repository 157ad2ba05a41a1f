"""The resources the API server emulator serves, and how they are described.

This module is pure data and functions: the resource types (namespaces,
pods, config maps), the discovery documents kubectl reads to map names to
paths, the defaults a new object receives, the ``meta.k8s.io/v1`` ``Table``
rows ``kubectl get`` prints, and the parsing of request paths.
"""

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

VERSION = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.0+arc-emulator",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-04-23T00:00:00Z",
    "goVersion": "go1.24.2",
    "compiler": "gc",
    "platform": "linux/amd64",
}

NODE_NAME = "emulator"


@dataclass(frozen=True)
class Column:
    """One column of a ``Table``: its definition and how to fill a cell."""

    name: str
    type: str
    description: str
    cell: object
    format: str = ""
    priority: int = 0

    def definition(self):
        return {
            "name": self.name,
            "type": self.type,
            "format": self.format,
            "description": self.description,
            "priority": self.priority,
        }


@dataclass(frozen=True)
class ResourceType:
    """A kind of object the emulator stores."""

    name: str
    kind: str
    namespaced: bool
    shortNames: tuple = ()
    categories: tuple = ()
    subresources: tuple = ()
    columns: tuple = ()
    defaults: dict = field(default_factory=dict)
    initializer: object = None

    def discovery(self):
        """The ``APIResource`` entries for this type and its subresources."""
        entries = [
            {
                "name": self.name,
                "singularName": self.kind.lower(),
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                "shortNames": list(self.shortNames),
                "categories": list(self.categories),
            }
        ]
        for subresource, kind, verbs in self.subresources:
            entries.append(
                {
                    "name": f"{self.name}/{subresource}",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": kind,
                    "verbs": list(verbs),
                }
            )
        return entries

    def initialize(self, obj, now):
        """Fill in what the server sets on a new object (status, node...).

        @param now: the creation time, as an RFC 3339 timestamp.
        """
        for key, value in self.defaults.items():
            section = obj.setdefault(key, {})
            for subkey, subvalue in value.items():
                section.setdefault(subkey, subvalue)
        if self.initializer is not None:
            self.initializer(obj, now)


def _initializePod(pod, now):
    """Give a new pod a running status with every container ready."""
    containers = pod.get("spec", {}).get("containers", [])
    status = pod.setdefault("status", {})
    status.setdefault("phase", "Running")
    status.setdefault("podIP", "10.0.0.1")
    status.setdefault("hostIP", "127.0.0.1")
    status.setdefault("startTime", now)
    status.setdefault(
        "conditions",
        [
            {"type": t, "status": "True", "lastTransitionTime": now}
            for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
        ],
    )
    status.setdefault(
        "containerStatuses",
        [
            {
                "name": c.get("name", ""),
                "image": c.get("image", ""),
                "imageID": "",
                "ready": True,
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            }
            for c in containers
        ],
    )


def age(obj, now):
    """The ``AGE`` cell of an object, in kubectl's short human format."""
    created = obj.get("metadata", {}).get("creationTimestamp")
    if not created:
        return "<unknown>"
    seconds = int((now - datetime.fromisoformat(created)).total_seconds())
    return humanDuration(max(seconds, 0))


def humanDuration(seconds):
    """Format a duration as Kubernetes' ``HumanDuration`` does (``5m3s``, ``2d``)."""
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    return f"{days}d"


def _name(obj, now):
    return obj["metadata"]["name"]


def _podReady(pod, now):
    statuses = pod.get("status", {}).get("containerStatuses", [])
    ready = sum(1 for s in statuses if s.get("ready"))
    return f"{ready}/{len(pod.get('spec', {}).get('containers', []))}"


def _podRestarts(pod, now):
    return sum(s.get("restartCount", 0) for s in pod.get("status", {}).get("containerStatuses", []))


def _nameColumn():
    return Column("Name", "string", "Name must be unique within a namespace.", _name, "name")


def _ageColumn():
    return Column("Age", "string", "CreationTimestamp is when the object was created.", age)


NAMESPACES = ResourceType(
    "namespaces",
    "Namespace",
    namespaced=False,
    shortNames=("ns",),
    columns=(
        _nameColumn(),
        Column(
            "Status",
            "string",
            "The status of the namespace",
            lambda o, now: o.get("status", {}).get("phase", ""),
        ),
        _ageColumn(),
    ),
    defaults={"spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}},
)

PODS = ResourceType(
    "pods",
    "Pod",
    namespaced=True,
    shortNames=("po",),
    categories=("all",),
    subresources=(
        ("log", "Pod", ("get",)),
        ("attach", "PodAttachOptions", ("create", "get")),
        ("exec", "PodExecOptions", ("create", "get")),
        ("portforward", "PodPortForwardOptions", ("create", "get")),
    ),
    columns=(
        _nameColumn(),
        Column(
            "Ready",
            "string",
            "The aggregate readiness state of this pod for accepting traffic.",
            _podReady,
        ),
        Column(
            "Status",
            "string",
            "The aggregate status of the containers in this pod.",
            lambda o, now: o.get("status", {}).get("phase", ""),
        ),
        Column(
            "Restarts",
            "integer",
            "The number of times the containers in this pod have been restarted.",
            _podRestarts,
        ),
        _ageColumn(),
        Column(
            "IP",
            "string",
            "IP address allocated to the pod.",
            lambda o, now: o.get("status", {}).get("podIP", ""),
            priority=1,
        ),
        Column(
            "Node",
            "string",
            "Name of the node the pod is assigned to.",
            lambda o, now: o.get("spec", {}).get("nodeName", ""),
            priority=1,
        ),
    ),
    defaults={
        "spec": {"nodeName": NODE_NAME, "restartPolicy": "Always", "dnsPolicy": "ClusterFirst"}
    },
    initializer=_initializePod,
)

CONFIGMAPS = ResourceType(
    "configmaps",
    "ConfigMap",
    namespaced=True,
    shortNames=("cm",),
    columns=(
        _nameColumn(),
        Column(
            "Data",
            "integer",
            "Number of keys in the config map.",
            lambda o, now: len(o.get("data") or {}) + len(o.get("binaryData") or {}),
        ),
        _ageColumn(),
    ),
)

CORE_TYPES = {t.name: t for t in (NAMESPACES, PODS, CONFIGMAPS)}

SELF_SUBJECT_REVIEWS = {
    "name": "selfsubjectreviews",
    "singularName": "selfsubjectreview",
    "namespaced": False,
    "kind": "SelfSubjectReview",
    "verbs": ["create"],
}
SELF_SUBJECT_ACCESS_REVIEWS = {
    "name": "selfsubjectaccessreviews",
    "singularName": "selfsubjectaccessreview",
    "namespaced": False,
    "kind": "SelfSubjectAccessReview",
    "verbs": ["create"],
}

SUBJECT_ACCESS_REVIEWS = {
    "name": "subjectaccessreviews",
    "singularName": "subjectaccessreview",
    "namespaced": False,
    "kind": "SubjectAccessReview",
    "verbs": ["create"],
}

GROUPS = {
    "authentication.k8s.io": {"v1": [SELF_SUBJECT_REVIEWS]},
    "authorization.k8s.io": {"v1": [SELF_SUBJECT_ACCESS_REVIEWS, SUBJECT_ACCESS_REVIEWS]},
}


def apiVersions(serverAddress):
    """``GET /api``: the core group's versions."""
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": serverAddress}],
    }


def _group(name):
    versions = [{"groupVersion": f"{name}/{v}", "version": v} for v in GROUPS[name]]
    return {"name": name, "versions": versions, "preferredVersion": versions[0]}


def apiGroupList():
    """``GET /apis``: the named groups."""
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group(name) for name in GROUPS]}


def apiGroup(name):
    """``GET /apis/<group>``, or C{None} for an unknown group."""
    if name not in GROUPS:
        return None
    return dict(_group(name), kind="APIGroup", apiVersion="v1")


def apiResourceList(group, version):
    """``GET /api/v1`` or ``GET /apis/<group>/<version>``; C{None} if unknown."""
    if group == "" and version == "v1":
        resources = [entry for t in CORE_TYPES.values() for entry in t.discovery()]
    elif version in GROUPS.get(group, {}):
        resources = GROUPS[group][version]
    else:
        return None
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }


def openAPIDocument():
    """``GET /openapi/v3/api/v1``: just enough OpenAPI for ``kubectl apply``.

    kubectl validates manifests on the server when the OpenAPI v3 document
    shows a ``fieldValidation`` parameter on the kind's PATCH operation, and
    otherwise insists on a full OpenAPI v2 schema to validate them itself.
    So each core kind gets a PATCH operation with that parameter.
    """
    paths = {}
    for rt in CORE_TYPES.values():
        scope = "/namespaces/{namespace}" if rt.namespaced else ""
        paths[f"/api/v1{scope}/{rt.name}/{{name}}"] = {
            "patch": {
                "operationId": f"patchCoreV1{rt.kind}",
                "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
                ],
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-group-version-kind": {"group": "", "version": "v1", "kind": rt.kind},
            }
        }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": VERSION["gitVersion"]},
        "paths": paths,
        "components": {"schemas": {}},
    }


def openAPIRoot():
    """``GET /openapi/v3``: where the core group's document is."""
    digest = hashlib.sha256(json.dumps(openAPIDocument(), sort_keys=True).encode()).hexdigest()
    return {"paths": {"api/v1": {"serverRelativeURL": f"/openapi/v3/api/v1?hash={digest.upper()}"}}}


def table(resourceType, objects, resourceVersion, now):
    """A ``meta.k8s.io/v1`` ``Table`` of C{objects} for ``kubectl get``."""
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": str(resourceVersion)},
        "columnDefinitions": [c.definition() for c in resourceType.columns],
        "rows": [
            {
                "cells": [c.cell(obj, now) for c in resourceType.columns],
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                },
            }
            for obj in objects
        ],
    }


@dataclass(frozen=True)
class Target:
    """What a core ``/api/v1/...`` request path names."""

    resourceType: ResourceType
    namespace: str = ""
    name: str = ""
    subresource: str = ""


def parseCorePath(segments):
    """Parse the segments after ``/api/v1/`` into a L{Target}, or C{None}.

    ``namespaces/NS/pods/NAME/log`` names a subresource of a namespaced
    object, ``namespaces/NAME`` a namespace, and ``pods`` alone every pod in
    every namespace.
    """
    if len(segments) >= 3 and segments[0] == "namespaces":
        namespace, rest = segments[1], segments[2:]
        resourceType = CORE_TYPES.get(rest[0])
        if resourceType is None or not resourceType.namespaced or len(rest) > 3:
            return None
        return Target(resourceType, namespace, *rest[1:])
    resourceType = CORE_TYPES.get(segments[0]) if segments else None
    if resourceType is None or len(segments) > (1 if resourceType.namespaced else 2):
        return None
    return Target(resourceType, "", *segments[1:])


def nowUTC(clock):
    """The time C{clock()} as an aware UTC datetime."""
    return datetime.fromtimestamp(clock(), timezone.utc)


def timestamp(when):
    """An RFC 3339 timestamp in the form Kubernetes writes (seconds, ``Z``)."""
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
