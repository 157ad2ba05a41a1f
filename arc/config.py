"""YAML configuration: parsed once, checked key by key.

:class:`Node` wraps one mapping of a loaded file and hands out typed values;
every problem raises :class:`~arc.errors.ConfigError` naming the file, the
dotted key and the reason.  :meth:`Node.finish` rejects keys nobody asked
for, so a misspelt key stops start-up instead of being ignored.
"""

import os
import re

import yaml

from arc.errors import ConfigError

MISSING = object()
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a mapping"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def load(path):
    """Load a YAML file whose top level is a mapping; returns a :class:`Node`."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("cannot read configuration: %s" % (e.strerror,), file=path) from None
    except yaml.YAMLError as e:
        raise ConfigError("not valid YAML: %s" % (e,), file=path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of keys to values", file=path)
    return Node(data, path)


class Node:
    def __init__(self, data, file, prefix=""):
        self.data = data
        self.file = file
        self.prefix = prefix
        self.base = os.path.dirname(file) if file else os.getcwd()
        self._seen = set()

    def key(self, name):
        return self.prefix + str(name)

    def error(self, name, reason):
        return ConfigError(reason, file=self.file, key=self.key(name))

    def has(self, name):
        return name in self.data and self.data[name] is not None

    def get(self, name, kind, default=MISSING):
        self._seen.add(name)
        value = self.data.get(name)
        if value is None:
            if default is MISSING:
                raise self.error(name, "required key is missing")
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(name, "must be %s, not %r" % (_TYPE_NAMES.get(kind, kind), value))
        return value

    def positive(self, name, kind, default=MISSING):
        value = self.get(name, kind, default)
        if value is not None and value <= 0:
            raise self.error(name, "must be greater than zero, not %r" % (value,))
        return value

    def choice(self, name, choices, default=MISSING):
        value = self.get(name, str, default)
        if value not in choices:
            raise self.error(name, "must be one of %s, not %r" % (", ".join(choices), value))
        return value

    def path(self, name, default=MISSING, must_exist=True):
        value = self.get(name, str, default)
        if value is None:
            return None
        value = os.path.expanduser(value)
        full = value if os.path.isabs(value) else os.path.join(self.base, value)
        if must_exist and not os.path.exists(full):
            raise self.error(name, "file %s does not exist" % (full,))
        return full

    def section(self, name, required=False):
        self._seen.add(name)
        value = self.data.get(name)
        if value is None:
            if required:
                raise self.error(name, "required section is missing")
            return Node({}, self.file, self.key(name) + ".")
        if not isinstance(value, dict):
            raise self.error(name, "must be a mapping")
        return Node(value, self.file, self.key(name) + ".")

    def items(self, name):
        """Entries of a mapping-valued key, as ``(key, Node)``."""
        section = self.section(name)
        out = []
        for key, value in section.data.items():
            if not isinstance(value, dict):
                raise section.error(key, "must be a mapping")
            out.append((str(key), Node(value, self.file, section.key(key) + ".")))
        return out

    def list_of_nodes(self, name):
        values = self.get(name, list, [])
        out = []
        for i, value in enumerate(values):
            if not isinstance(value, dict):
                raise self.error("%s[%d]" % (name, i), "must be a mapping")
            out.append(Node(value, self.file, "%s[%d]." % (self.key(name), i)))
        return out

    def strings(self, name, default=()):
        values = self.get(name, list, list(default))
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise self.error("%s[%d]" % (name, i), "must be a string")
        return tuple(values)

    def secret(self, name, required=True, environ=None):
        """A secret given as ``NAME_file`` (path) or ``NAME_env`` (variable name).

        Returns a callable reading it, so a rotated file is picked up.
        """
        environ = os.environ if environ is None else environ
        file_key, env_key = name + "_file", name + "_env"
        if self.has(file_key):
            path = self.path(file_key)

            def read_file():
                with open(path, "r", encoding="utf-8") as f:
                    value = f.read().strip()
                if not value:
                    raise ConfigError("secret file is empty", file=path)
                return value

            read_file()
            return read_file
        if self.has(env_key):
            variable = self.get(env_key, str)
            if variable not in environ and required:
                raise self.error(env_key, "environment variable %s is not set" % (variable,))
            return lambda: environ[variable]
        self._seen.update((file_key, env_key))
        if name in self.data:
            raise self.error(name, "secrets are not accepted inline: use %s (a path) or %s "
                                   "(an environment variable)" % (file_key, env_key))
        if required:
            raise self.error(file_key, "required: give %s (a path) or %s (an environment "
                                       "variable)" % (file_key, env_key))
        return None

    def finish(self):
        """Reject keys that were never read (misspellings, unknown options)."""
        unknown = sorted(str(k) for k in self.data if k not in self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key (known here: %s)"
                             % (", ".join(sorted(map(str, self._seen))) or "none",))


def cluster_name(node, name, value):
    if not DNS_LABEL.match(value):
        raise node.error(name, "cluster name %r must be a DNS label: lower-case letters, digits "
                               "and '-', at most 63 characters" % (value,))
    return value
