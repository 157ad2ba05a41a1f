"""``arc agent manifest NAME --relay-url URL``: Kubernetes YAML for a cluster's agent.

Prints, for ``kubectl apply -f -``: the Namespace, the agent's
ServiceAccount, its RBAC (only ``impersonate``, and only when the guard
impersonates), a ConfigMap holding ``agent.yaml`` (and the relay's CA), a
hardened Deployment and a NetworkPolicy.  The agent token is never part of
the output: the Deployment mounts the Secret ``arc-agent-token``, created
separately from the token ``arc cluster add`` printed (the command is in
the output's header).  The agent finds its API server through its service
account, as every in-cluster Kubernetes client does.
"""

import hashlib
from urllib.parse import urlsplit

import yaml

from arc import __version__
from arc.cli.main import CommandError
from arc.config import DNS_LABEL
from arc.identity.settings import https_url_problem

DEFAULT_IMAGE = "arc:%s" % (__version__,)
DEFAULT_NAMESPACE = "arc-system"
SECRET = "arc-agent-token"
NAME = "arc-agent"
UID = 10001                      # the image's arc user (see Dockerfile)
CONFIG_DIR = "/etc/arc"
TOKEN_DIR = "/var/run/secrets/arc"
API_SERVER_PORTS = (443, 6443)   # the kubernetes Service port and the usual endpoint port

# probe.py in the ConfigMap, run by the kubelet in the container as
# `python /etc/arc/probe.py ready|alive`.  It reads the pod's own TCP table: no
# port is opened for it and nothing is faked.
#   ready: a connection to the relay (its address and port) is ESTABLISHED,
#          so during a rolling update the old pod stays until the new one has
#          its tunnel;
#   alive: no connection to the relay sits in CLOSE_WAIT, the state of a
#          socket whose peer closed it while this process no longer serves its
#          sockets (a blocked event loop); a working agent closes at once.
# Connections to the API server (KUBERNETES_SERVICE_HOST) never count.
PROBE = """\
# Health of the arc agent from its TCP table (see `arc agent manifest`).
import ipaddress, os, socket, sys
HOST, PORT = {host!r}, {port}
def norm(a):
    a = ipaddress.ip_address(a)
    return getattr(a, "ipv4_mapped", None) or a
try:
    relay = {{norm(i[4][0].split("%")[0]) for i in socket.getaddrinfo(HOST, PORT, proto=6)}}
except (OSError, ValueError):
    relay = None
api = os.environ.get("KUBERNETES_SERVICE_HOST")
states = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        rows = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for row in rows:
        field = row.split()
        raw, port = field[2].split(":")
        b = bytes.fromhex(raw)
        peer = norm(b"".join(b[i:i + 4][::-1] for i in range(0, len(b), 4)))
        if int(port, 16) == PORT and (peer in relay if relay else str(peer) != api):
            states.add(field[3])
if sys.argv[1] == "ready":
    sys.exit(0 if "01" in states else "no tunnel: no connection to the relay %s:%d is "
             "established (see the agent's log)" % (HOST, PORT))
sys.exit("a connection to the relay %s:%d is stuck in CLOSE_WAIT: the agent no longer "
         "serves its sockets" % (HOST, PORT) if "08" in states else 0)
"""


# -- the command line -----------------------------------------------------------------


def add_arguments_agent(parser):
    sub = parser.add_subparsers(dest="agent_command", metavar="SUBCOMMAND", required=True)
    manifest = sub.add_parser(
        "manifest", help="print Kubernetes YAML running the agent of cluster NAME",
        description="Print Kubernetes YAML running the agent of cluster NAME (apply it with "
                    "`kubectl apply -f -`).  The agent token is not included: the output's "
                    "header shows the command creating its Secret.")
    manifest.add_argument("name", metavar="NAME", help="the cluster's name at the relay")
    manifest.add_argument("--relay-url", required=True, metavar="URL",
                          help="the relay, https://HOST[:PORT]")
    manifest.add_argument("--relay-ca-file", metavar="F",
                          help="PEM CA bundle for the relay's certificate (default: the "
                               "image's system trust store)")
    manifest.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                          help="namespace of the agent (default %(default)s)")
    manifest.add_argument("--image", default=DEFAULT_IMAGE,
                          help="container image built from the Dockerfile (default "
                               "%(default)s)")
    manifest.add_argument("--replicas", type=int, default=1,
                          help="agent pods, each with its own tunnel (default %(default)s)")
    manifest.add_argument("--guard", choices=("passthrough", "oidc"), default="passthrough",
                          help="passthrough: each caller's own Kubernetes token reaches the API "
                               "server (the agent needs no RBAC); oidc: the guard verifies OIDC "
                               "ID tokens and impersonates the caller (default %(default)s)")
    manifest.add_argument("--oidc-issuer", metavar="URL", help="with --guard oidc: the issuer")
    manifest.add_argument("--oidc-client-id", metavar="ID",
                          help="with --guard oidc: the client id expected in the token's aud")
    manifest.add_argument("--allow-impersonation", action="store_true",
                          help="with --guard oidc: let callers use kubectl --as, each checked "
                               "with a SubjectAccessReview (grants create on "
                               "subjectaccessreviews)")


def run_agent(args):
    ca_pem = None
    if args.relay_ca_file:
        ca_pem = _read_ca(args.relay_ca_file)
    print(manifest(args.name, args.relay_url, ca_pem=ca_pem, namespace=args.namespace,
                   image=args.image, replicas=args.replicas, guard=args.guard,
                   oidc_issuer=args.oidc_issuer, oidc_client_id=args.oidc_client_id,
                   allow_impersonation=args.allow_impersonation), end="")


def _read_ca(path):
    try:
        with open(path, "r", encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CommandError("cannot read the relay CA file %s: %s; give a PEM file"
                           % (path, getattr(e, "strerror", None) or e)) from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise CommandError("%s holds no PEM certificate; give the CA bundle that signed the "
                           "relay's certificate" % (path,))
    return text


# -- the manifests ----------------------------------------------------------------------


def manifest(cluster, relay_url, *, ca_pem=None, namespace=DEFAULT_NAMESPACE,
             image=DEFAULT_IMAGE, replicas=1, guard="passthrough", oidc_issuer=None,
             oidc_client_id=None, allow_impersonation=False):
    """The YAML text of every object, with a header of instructions."""
    host, port = _check(cluster, relay_url, namespace, replicas, guard, oidc_issuer,
                        oidc_client_id, allow_impersonation)
    labels = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/instance": cluster,
              "app.kubernetes.io/part-of": "arc"}
    config = agent_config(cluster, relay_url, ca_pem is not None, guard, oidc_issuer,
                          oidc_client_id, allow_impersonation)
    data = {"agent.yaml": config, "probe.py": PROBE.format(host=host, port=port)}
    if ca_pem is not None:
        data["relay-ca.crt"] = ca_pem
    impersonates = guard == "oidc"
    docs = [
        (None, _namespace(namespace)),
        (None, _meta("v1", "ServiceAccount", namespace, labels)),
    ]
    if impersonates:
        docs += _rbac(namespace, labels, allow_impersonation)
    docs += [
        ("agent.yaml: the API server is found through the service account (in-cluster).\n"
         "# probe.py: readiness (tunnel established) and liveness (sockets served).",
         dict(_meta("v1", "ConfigMap", namespace, labels), data=data)),
        ("Probes: see probe.py above.  Token: the Secret %s, created separately." % (SECRET,),
         _deployment(namespace, labels, image, replicas, data)),
        ("Egress only to DNS, the relay and the API server; nothing may connect in.",
         _network_policy(namespace, labels, port, oidc_issuer if impersonates else None)),
    ]
    out = [_header(cluster, namespace, impersonates)]
    for comment, obj in docs:
        text = ""
        if comment:
            text += "# %s\n" % (comment,)
        out.append(text + yaml.dump(obj, Dumper=_Dumper, sort_keys=False,
                                    default_flow_style=False))
    return "---\n".join(out)


def agent_config(cluster, relay_url, with_ca, guard, oidc_issuer, oidc_client_id,
                 allow_impersonation):
    """The agent.yaml of the ConfigMap (relative paths are relative to it)."""
    relay = {"url": relay_url}
    if with_ca:
        relay["ca_file"] = "relay-ca.crt"
    relay["token_file"] = "%s/agent-token" % (TOKEN_DIR,)
    config = {"cluster": cluster, "relay": relay}
    if guard == "oidc":
        config["guard"] = {
            "identity": {"oidc": [{"issuer": oidc_issuer, "client_id": oidc_client_id}]},
            "allow_impersonation": bool(allow_impersonation),
            "audit": {"destination": "stdout"},
        }
    else:
        config["guard"] = {"audit": {"destination": "stdout"}}
    return ("# arc agent for cluster %s (from `arc agent manifest`); see etc/agent.yaml.\n"
            % (cluster,) + yaml.safe_dump(config, sort_keys=False, default_flow_style=False))


def _check(cluster, relay_url, namespace, replicas, guard, oidc_issuer, oidc_client_id,
           allow_impersonation):
    """Refuse what would produce a pod that cannot work; returns the relay's host and port."""
    if not DNS_LABEL.match(cluster):
        raise CommandError("cluster name %r must be a DNS label (lower-case letters, digits, "
                           "'-'), as registered with `arc cluster add`" % (cluster,))
    if not DNS_LABEL.match(namespace):
        raise CommandError("namespace %r must be a DNS label (lower-case letters, digits, '-')"
                           % (namespace,))
    if replicas < 1:
        raise CommandError("--replicas must be at least 1, not %d" % (replicas,))
    try:
        parts = urlsplit(relay_url)
        port = parts.port or 443
    except ValueError as e:
        raise CommandError("--relay-url %r is not a URL (%s); give https://HOST[:PORT]"
                           % (relay_url, e)) from None
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username:
        raise CommandError("--relay-url must look like https://relay.example.com[:port] (TLS, "
                           "no path), not %r" % (relay_url,))
    if guard == "oidc":
        if not oidc_issuer or not oidc_client_id:
            raise CommandError("--guard oidc needs --oidc-issuer URL and --oidc-client-id ID "
                               "(the client id your identity provider puts in `aud`)")
        problem = https_url_problem(oidc_issuer)
        if problem:
            raise CommandError("--oidc-issuer " + problem)
    elif oidc_issuer or oidc_client_id or allow_impersonation:
        raise CommandError("--oidc-issuer, --oidc-client-id and --allow-impersonation apply to "
                           "--guard oidc only; add --guard oidc or drop them")
    return parts.hostname, port


def _header(cluster, namespace, impersonates):
    lines = [
        "arc agent for cluster %s: apply with `kubectl apply -f FILE`." % (cluster,),
        "",
        "The agent token is not in this file.  Store the token that `arc cluster add %s`"
        % (cluster,),
        "(or `arc cluster rotate-token %s`) printed in the Secret %s:" % (cluster, SECRET),
        "  kubectl -n %s create secret generic %s --from-file=token=./%s.token"
        % (namespace, SECRET, cluster),
        "The pod waits for the Secret; to replace it later add",
        "`--dry-run=client -o yaml | kubectl apply -f -`.",
        "",
        "The Namespace enforces the Pod Security \"restricted\" profile: give the agent a",
        "namespace of its own.",
    ]
    if not impersonates:
        lines += ["",
                  "Passthrough guard: each caller's own token reaches the API server, so the",
                  "agent's service account is granted nothing."]
    return "".join("# %s\n" % (line,) if line else "#\n" for line in lines)


def _meta(api_version, kind, namespace, labels, name=NAME):
    metadata = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    metadata["labels"] = dict(labels)
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata}


def _namespace(namespace):
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": namespace, "labels": {
                "app.kubernetes.io/part-of": "arc",
                "pod-security.kubernetes.io/enforce": "restricted"}}}


def _rbac(namespace, labels, allow_impersonation):
    """The guard acts as each verified caller: it may impersonate, and nothing else."""
    subject = [{"kind": "ServiceAccount", "name": NAME, "namespace": namespace}]
    roles = [("%s-impersonate" % (NAME,),
              "The guard impersonates callers it verified itself; it reads nothing on its own.",
              [{"apiGroups": [""], "resources": ["users", "groups", "serviceaccounts"],
                "verbs": ["impersonate"]},
               {"apiGroups": ["authentication.k8s.io"], "resources": ["uids", "userextras/*"],
                "verbs": ["impersonate"]}])]
    if allow_impersonation:
        roles.append(("%s-impersonation-review" % (NAME,),
                      "kubectl --as: may the caller impersonate that identity? "
                      "(SubjectAccessReview)",
                      [{"apiGroups": ["authorization.k8s.io"],
                        "resources": ["subjectaccessreviews"], "verbs": ["create"]}]))
    docs = []
    for name, comment, rules in roles:
        docs.append((comment, dict(_meta("rbac.authorization.k8s.io/v1", "ClusterRole", None,
                                         labels, name), rules=rules)))
        docs.append((None, dict(_meta("rbac.authorization.k8s.io/v1", "ClusterRoleBinding",
                                      None, labels, name),
                                roleRef={"apiGroup": "rbac.authorization.k8s.io",
                                         "kind": "ClusterRole", "name": name},
                                subjects=subject)))
    return docs


def _probe(check, period):
    return {"exec": {"command": ["python", "%s/probe.py" % (CONFIG_DIR,), check]},
            "periodSeconds": period, "timeoutSeconds": 5, "failureThreshold": 3}


def _deployment(namespace, labels, image, replicas, config_data):
    selector = {k: labels[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance")}
    digest = hashlib.sha256(yaml.safe_dump(config_data, sort_keys=True).encode()).hexdigest()
    container = {
        "name": "agent",
        "image": image,
        "args": ["arc-agent", "--config", "%s/agent.yaml" % (CONFIG_DIR,)],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                      "limits": {"cpu": "1", "memory": "256Mi"}},
        "readinessProbe": _probe("ready", 10),
        "livenessProbe": dict(_probe("alive", 20), initialDelaySeconds=30),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "agent-token", "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod = {
        "serviceAccountName": NAME,
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "fsGroup": UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": NAME}},
            {"name": "agent-token", "secret": {"secretName": SECRET, "defaultMode": 0o440,
                                               "items": [{"key": "token",
                                                          "path": "agent-token"}]}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}},
        ],
    }
    return dict(_meta("apps/v1", "Deployment", namespace, labels), spec={
        "replicas": replicas,
        "revisionHistoryLimit": 3,
        "selector": {"matchLabels": selector},
        # A new pod takes over before the old one goes: the tunnel stays up.
        "strategy": {"type": "RollingUpdate",
                     "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {
            "metadata": {"labels": dict(labels),
                         "annotations": {"checksum/config": digest}},
            "spec": pod,
        },
    })


def _network_policy(namespace, labels, relay_port, oidc_issuer):
    selector = {k: labels[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance")}
    ports = [relay_port] + list(API_SERVER_PORTS)
    if oidc_issuer:
        ports.append(urlsplit(oidc_issuer).port or 443)
    tcp = [{"protocol": "TCP", "port": p} for p in sorted(set(ports))]
    dns = {"to": [{"namespaceSelector": {"matchLabels": {
                       "kubernetes.io/metadata.name": "kube-system"}},
                   "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
           "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    return dict(_meta("networking.k8s.io/v1", "NetworkPolicy", namespace, labels), spec={
        "podSelector": {"matchLabels": selector},
        # Ingress is listed with no rule: no inbound connection is allowed.
        "policyTypes": ["Ingress", "Egress"],
        "egress": [dns, {"ports": tcp}],
    })


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (agent.yaml, PEM, the probe) as readable literal blocks."""


def _str(dumper, value):
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)
