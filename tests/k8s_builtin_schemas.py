"""JSON Schemas of the built-in Kubernetes kinds under k8s/, for the offline validation in test_k8s_manifests.py.

The KubeRay CRDs carry their own schemas; built-in kinds do not ship with this
repository, so the fields used here are written out from the Kubernetes API
reference (networking.k8s.io/v1 NetworkPolicy, Kubernetes 1.32), with
``additionalProperties: false`` wherever the API has a fixed set of fields so a
misspelt key fails. Extend ``BUILTIN_SCHEMAS`` when k8s/ gains another kind.
"""

from __future__ import annotations

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}

_PEER = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {
        "podSelector": _LABEL_SELECTOR,
        "namespaceSelector": _LABEL_SELECTOR,
        "ipBlock": {
            "type": "object",
            "additionalProperties": False,
            "required": ["cidr"],
            "properties": {"cidr": {"type": "string"}, "except": {"type": "array", "items": {"type": "string"}}},
        },
    },
}

_PORT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "protocol": {"type": "string", "enum": ["TCP", "UDP", "SCTP"]},
        "port": {"type": ["integer", "string"]},
        "endPort": {"type": "integer"},
    },
}


def _rule(peer_key: str) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {peer_key: {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _PORT}},
    }


NETWORK_POLICY_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"type": "string", "enum": ["networking.k8s.io/v1"]},
        "kind": {"type": "string", "enum": ["NetworkPolicy"]},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["podSelector"],
            "properties": {
                "podSelector": _LABEL_SELECTOR,
                "policyTypes": {"type": "array", "items": {"type": "string", "enum": ["Ingress", "Egress"]}},
                "ingress": {"type": "array", "items": _rule("from")},
                "egress": {"type": "array", "items": _rule("to")},
            },
        },
    },
}

BUILTIN_SCHEMAS = {("networking.k8s.io/v1", "NetworkPolicy"): NETWORK_POLICY_SCHEMA}
"""{(apiVersion, kind): JSON Schema} merged into the CRD schemas by test_k8s_manifests.py."""
