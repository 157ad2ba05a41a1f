"""PATCH bodies applied to stored objects: JSON merge and strategic merge.

Strategic merge is the subset kubectl's client-side apply produces for pods
and config maps: maps merge, ``null`` deletes, lists of containers, volumes,
env vars, ports and mounts merge by their key, other lists are replaced, and
the ``$patch``, ``$retainKeys`` and ``$deleteFromPrimitiveList`` directives
are honoured (``$setElementOrder`` is accepted and ignored).
"""

import copy

MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "ports": "containerPort",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}

_DELETE_FROM = "$deleteFromPrimitiveList/"


def mergePatch(target, patch):
    """Apply an RFC 7386 JSON merge patch; C{target} is left untouched."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = mergePatch(result.get(key), value)
    return result


def strategicMergePatch(target, patch):
    """Apply a Kubernetes strategic merge patch; C{target} is left untouched."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return strategicMergePatch(None, {k: v for k, v in patch.items() if k != "$patch"})
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith(_DELETE_FROM):
            field = key[len(_DELETE_FROM) :]
            result[field] = [v for v in result.get(field, []) if v not in value]
        elif key.startswith("$"):
            continue
        elif value is None or (isinstance(value, dict) and value.get("$patch") == "delete"):
            result.pop(key, None)
        elif key in MERGE_KEYS and isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _mergeList(result[key], value, MERGE_KEYS[key])
        else:
            result[key] = strategicMergePatch(result.get(key), value)
    if "$retainKeys" in patch:
        retain = set(patch["$retainKeys"])
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _mergeList(current, patch, mergeKey):
    """Merge a list of maps element by element, matched on C{mergeKey}."""
    result = copy.deepcopy(current)
    for item in patch:
        if not isinstance(item, dict) or mergeKey not in item:
            result.append(strategicMergePatch(None, item))
            continue
        index = next(
            (
                i
                for i, old in enumerate(result)
                if isinstance(old, dict) and old.get(mergeKey) == item[mergeKey]
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append(strategicMergePatch(None, item))
        else:
            result[index] = strategicMergePatch(result[index], item)
    return result
