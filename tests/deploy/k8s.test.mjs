// Kubernetes manifests: every target (tests/deploy/lib/repo.mjs kTargets) is rendered, validated
// against the Kubernetes schemas and checked against sflb's deployment policies (issue 5).

import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { describe, it, before } from "node:test";
import YAML from "yaml";
import { checkUnknownFields, validateObject } from "./lib/k8s-schema.mjs";
import { parseYamlDocuments } from "./lib/kustomize.mjs";
import {
  allContainers, durationSeconds, k8sDir, kPendingSettings, podTemplates, quantity,
  renderedTargets, selects, sourceStringLiterals,
} from "./lib/repo.mjs";

const kUid = 10001;
const kSecretEnv = /(^|_)(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)/;
const kExternalSecrets = new Set(["sflb-keys", "sflb-credentials"]);

const find = (objects, kind, name) => objects.find((o) => o.kind === kind && o.metadata?.name === name);
const component = (objects, comp) => podTemplates(objects)
    .filter((p) => p.labels["app.kubernetes.io/component"] === comp);
const envOf = (c) => Object.fromEntries((c.env || []).map((e) => [e.name, e]));

describe("rendering", () => {
  it("renders every target", (t) => {
    for (const target of renderedTargets()) {
      t.diagnostic(`${target.label}: ${target.objects.length} objects via ${target.renderer}`);
      assert.ok(target.objects.length > 0, target.label);
    }
  });
});

for (const target of renderedTargets()) {
  const { objects, label, kind } = target;

  describe(`${label}: schema`, () => {
    it("every object is valid against the Kubernetes API schema (kubernetes-models)", async () => {
      const problems = [];
      for (const obj of objects) {
        for (const msg of await validateObject(obj)) {
          problems.push(`${obj.kind}/${obj.metadata?.name}: ${msg}`);
        }
      }
      assert.deepEqual(problems, []);
    });
  });

  describe(`${label}: pods`, () => {
    const pods = podTemplates(objects);

    it("has the controlplane and dataplane workloads", () => {
      assert.equal(component(objects, "controlplane").length, 1, "one controlplane workload");
      assert.equal(component(objects, "dataplane").length, 1, "one dataplane workload");
    });

    for (const { obj, spec } of pods) {
      const name = `${obj.kind}/${obj.metadata.name}`;
      const psc = spec.securityContext || {};

      it(`${name}: pod is hardened (no token, non-root ${kUid}, seccomp, no host namespaces)`, () => {
        assert.equal(spec.automountServiceAccountToken, false, "automountServiceAccountToken");
        assert.equal(spec.enableServiceLinks, false, "enableServiceLinks (SFLB_* collisions)");
        assert.equal(psc.runAsNonRoot, true, "pod runAsNonRoot");
        assert.equal(psc.runAsUser, kUid, "pod runAsUser");
        assert.equal(psc.seccompProfile?.type, "RuntimeDefault", "pod seccompProfile");
        for (const f of ["hostNetwork", "hostPID", "hostIPC"]) assert.notEqual(spec[f], true, f);
        for (const v of spec.volumes || []) assert.ok(!v.hostPath, `hostPath volume ${v.name}`);
      });

      for (const c of allContainers(spec)) {
        const csc = c.securityContext || {};
        it(`${name}/${c.name}: probes`, () => {
          assert.ok(c.readinessProbe, "readinessProbe");
          assert.ok(c.livenessProbe, "livenessProbe");
          assert.ok(c.startupProbe, "startupProbe");
        });
        it(`${name}/${c.name}: resource requests and limits`, () => {
          for (const r of ["cpu", "memory"]) {
            const req = c.resources?.requests?.[r];
            const lim = c.resources?.limits?.[r];
            assert.ok(req !== undefined, `requests.${r}`);
            assert.ok(lim !== undefined, `limits.${r}`);
            assert.ok(quantity(req) <= quantity(lim), `requests.${r} ${req} <= limits.${r} ${lim}`);
          }
        });
        it(`${name}/${c.name}: container security context`, () => {
          assert.equal(csc.runAsNonRoot ?? psc.runAsNonRoot, true, "runAsNonRoot");
          assert.equal(csc.runAsUser ?? psc.runAsUser, kUid, "runAsUser");
          assert.equal(csc.readOnlyRootFilesystem, true, "readOnlyRootFilesystem");
          assert.equal(csc.allowPrivilegeEscalation, false, "allowPrivilegeEscalation");
          assert.notEqual(csc.privileged, true, "privileged");
          assert.ok((csc.capabilities?.drop || []).includes("ALL"), "capabilities.drop ALL");
          assert.deepEqual(csc.capabilities?.add || [], [], "capabilities.add");
          assert.equal((csc.seccompProfile || psc.seccompProfile)?.type, "RuntimeDefault", "seccomp");
        });
        it(`${name}/${c.name}: image has an explicit tag or digest, not latest`, () => {
          const m = /^(.*?)(?::([^:/@]+))?(@sha256:[0-9a-f]{64})?$/.exec(c.image);
          assert.ok(m && (m[2] || m[3]), `image ${c.image} has no tag or digest`);
          assert.notEqual(m[2], "latest", `image ${c.image}`);
        });
        it(`${name}/${c.name}: secrets come from Secrets, never inline`, () => {
          for (const e of c.env || []) {
            if (kSecretEnv.test(e.name)) {
              assert.equal(e.value, undefined, `env ${e.name} has an inline value`);
              assert.ok(e.valueFrom?.secretKeyRef, `env ${e.name} must use secretKeyRef`);
            }
          }
          for (const a of [...(c.command || []), ...(c.args || [])]) {
            assert.ok(!/^--(lb-api-key|admin-key)(=|$)/.test(a), `secret flag on command line: ${a}`);
          }
        });
      }
    }

    it("every referenced ConfigMap is rendered; every Secret is one of the documented ones", () => {
      for (const { obj, spec } of pods) {
        const cms = [];
        const secrets = [];
        for (const c of allContainers(spec)) {
          for (const e of c.envFrom || []) {
            if (e.configMapRef) cms.push(e.configMapRef.name);
            if (e.secretRef) secrets.push(e.secretRef.name);
          }
          for (const e of c.env || []) {
            if (e.valueFrom?.configMapKeyRef) cms.push(e.valueFrom.configMapKeyRef.name);
            if (e.valueFrom?.secretKeyRef) secrets.push(e.valueFrom.secretKeyRef.name);
          }
        }
        for (const v of spec.volumes || []) {
          if (v.configMap) cms.push(v.configMap.name);
          if (v.secret) secrets.push(v.secret.secretName);
          if (v.persistentVolumeClaim) {
            assert.ok(find(objects, "PersistentVolumeClaim", v.persistentVolumeClaim.claimName),
                      `${obj.metadata.name}: PVC ${v.persistentVolumeClaim.claimName}`);
          }
        }
        for (const n of cms) assert.ok(find(objects, "ConfigMap", n), `${obj.metadata.name}: ConfigMap ${n}`);
        for (const n of secrets) assert.ok(kExternalSecrets.has(n), `${obj.metadata.name}: Secret ${n}`);
      }
    });

    it("every environment variable name is a setting the binaries read", (t) => {
      const known = sourceStringLiterals();
      const names = new Set();
      for (const { spec } of pods) {
        for (const c of allContainers(spec)) for (const e of c.env || []) names.add(e.name);
      }
      for (const cm of objects.filter((o) => o.kind === "ConfigMap")) {
        for (const k of Object.keys(cm.data || {})) names.add(k);
      }
      const unknown = [];
      for (const n of names) {
        if (known.has(n)) continue;
        if (kPendingSettings.has(n)) t.diagnostic(`note: ${n} is not read by the binaries yet (${kPendingSettings.get(n)})`);
        else unknown.push(n);
      }
      assert.deepEqual(unknown, [], "names not found in controlplane/, dataplane/, ctl/, common/ sources");
    });
  });

  describe(`${label}: no Secret values`, () => {
    it("renders no Secret and no secret-looking ConfigMap key", () => {
      assert.deepEqual(objects.filter((o) => o.kind === "Secret").map((o) => o.metadata.name), []);
      for (const cm of objects.filter((o) => o.kind === "ConfigMap")) {
        for (const k of Object.keys(cm.data || {})) assert.ok(!kSecretEnv.test(k), `ConfigMap key ${k}`);
      }
    });
  });

  describe(`${label}: controlplane`, () => {
    const [cp] = component(objects, "controlplane");
    const c = cp?.spec.containers?.[0];

    it("runs one replica with a single writer (Recreate Deployment or StatefulSet)", () => {
      assert.ok(cp, "controlplane workload");
      assert.equal(cp.obj.spec.replicas, 1, "replicas");
      if (cp.obj.kind === "Deployment") assert.equal(cp.obj.spec.strategy?.type, "Recreate", "strategy");
      else assert.equal(cp.obj.kind, "StatefulSet");
      assert.deepEqual(c.command, ["/usr/local/bin/sflb-controlplane"], "command");
    });

    it("uses native gRPC probes on 50051", () => {
      for (const p of ["startupProbe", "readinessProbe", "livenessProbe"]) {
        assert.equal(c[p]?.grpc?.port, 50051, `${p}.grpc.port`);
      }
      assert.ok((c.ports || []).some((p) => p.containerPort === 50051 && p.name === "grpc"), "grpc port");
      assert.ok((c.ports || []).some((p) => p.containerPort === 9091 && p.name === "metrics"), "metrics port");
    });

    it("reads keys.txt from the sflb-keys Secret, mounted read-only without subPath", () => {
      const env = envOf(c);
      assert.equal(env.SFLB_KEYS_FILE?.value, "/etc/sflb/keys.txt");
      const vol = cp.spec.volumes.find((v) => v.secret?.secretName === "sflb-keys");
      assert.ok(vol, "sflb-keys volume");
      const mount = c.volumeMounts.find((m) => m.name === vol.name);
      assert.equal(mount?.mountPath, "/etc/sflb");
      assert.equal(mount.readOnly, true, "read-only");
      assert.equal(mount.subPath, undefined, "subPath mounts never see Secret updates");
      if (vol.secret.items) assert.ok(vol.secret.items.some((i) => i.key === "keys.txt" && i.path === "keys.txt"));
    });

    it("keeps state and audit log on a PersistentVolumeClaim", () => {
      const env = envOf(c);
      const data = cp.spec.volumes.find((v) => v.persistentVolumeClaim);
      assert.ok(data, "PVC volume");
      const mount = c.volumeMounts.find((m) => m.name === data.name);
      for (const n of ["SFLB_STATE_FILE", "SFLB_AUDIT_LOG"]) {
        assert.ok(env[n]?.value?.startsWith(`${mount.mountPath}/`), `${n} under ${mount.mountPath}`);
      }
      assert.equal(cp.spec.securityContext.fsGroup, kUid, "fsGroup makes the volume writable");
    });

    it("admin key from sflb-credentials", () => {
      assert.deepEqual(envOf(c).LB_ADMIN_KEY?.valueFrom?.secretKeyRef,
                       { name: "sflb-credentials", key: "LB_ADMIN_KEY" });
    });

    it("has a gRPC Service sflb-controlplane:50051 selecting it", () => {
      const svc = find(objects, "Service", "sflb-controlplane");
      assert.ok(svc, "Service sflb-controlplane");
      assert.ok(selects({ matchLabels: svc.spec.selector }, cp.labels), "selector matches pods");
      const port = svc.spec.ports.find((p) => p.port === 50051);
      assert.ok(port, "port 50051");
      const target = port.targetPort;
      assert.ok(c.ports.some((p) => p.name === target || p.containerPort === target), "targetPort");
    });
  });

  describe(`${label}: NetworkPolicy`, () => {
    const [cp] = component(objects, "controlplane");
    const [dp] = component(objects, "dataplane");
    const policies = objects.filter((o) => o.kind === "NetworkPolicy" &&
                                           selects(o.spec.podSelector, cp.labels));

    it("a NetworkPolicy selects the controlplane pods for Ingress", () => {
      assert.ok(policies.length >= 1, "no NetworkPolicy selects the controlplane");
      assert.ok(policies.some((p) => (p.spec.policyTypes || ["Ingress"]).includes("Ingress")));
    });

    it("only dataplanes and sflb.io/admin peers reach 50051", () => {
      let dataplaneAllowed = false;
      for (const p of policies) {
        for (const rule of p.spec.ingress || []) {
          const ports = rule.ports;
          const covers50051 = !ports || ports.length === 0 ||
              ports.some((x) => x.port === 50051 || x.port === "grpc" ||
                                (x.endPort && x.port <= 50051 && 50051 <= x.endPort) || x.port === undefined);
          if (!covers50051) continue;
          assert.ok(rule.from && rule.from.length > 0,
                    `${p.metadata.name}: a rule opens 50051 to every source`);
          for (const peer of rule.from) {
            assert.ok(!peer.ipBlock, `${p.metadata.name}: ipBlock peer on 50051`);
            const podSel = peer.podSelector;
            const nsSel = peer.namespaceSelector;
            const isAdmin = (s) => s?.matchLabels?.["sflb.io/admin"] === "true";
            const isDataplane = podSel && !nsSel && selects(podSel, dp.labels) &&
                                podSel.matchLabels?.["app.kubernetes.io/component"] === "dataplane";
            // Dataplane pods of this namespace, admin pods of this namespace, or an admin namespace.
            const ok = isDataplane || (!nsSel && isAdmin(podSel)) || isAdmin(nsSel);
            assert.ok(ok, `${p.metadata.name}: peer ${JSON.stringify(peer)} is neither a dataplane nor sflb.io/admin`);
            if (isDataplane) dataplaneAllowed = true;
          }
        }
      }
      assert.ok(dataplaneAllowed, "the dataplane pods must be allowed to reach 50051");
    });
  });

  describe(`${label}: dataplane`, () => {
    const [dp] = component(objects, "dataplane");
    const c = dp?.spec.containers?.[0];
    const hpa = objects.find((o) => o.kind === "HorizontalPodAutoscaler" &&
                                    o.spec.scaleTargetRef?.name === dp?.obj.metadata.name);
    const pdb = objects.find((o) => o.kind === "PodDisruptionBudget" && selects(o.spec.selector, dp?.labels || {}));

    it("is a Deployment running sflb-dataplane against sflb-controlplane:50051", () => {
      assert.equal(dp.obj.kind, "Deployment");
      assert.deepEqual(c.command, ["/usr/local/bin/sflb-dataplane"]);
      const env = envOf(c);
      assert.equal(env.SFLB_CONTROLPLANE?.value, "sflb-controlplane:50051");
      for (const k of ["LB_API_KEY", "LB_ADMIN_KEY"]) {
        assert.deepEqual(env[k]?.valueFrom?.secretKeyRef, { name: "sflb-credentials", key: k });
      }
    });

    it("probes: startup, readiness /readyz, liveness /livez on the HTTP port", () => {
      const http = c.ports.find((p) => p.containerPort === 3000);
      assert.ok(http, "containerPort 3000");
      const isHttpPort = (port) => port === 3000 || port === http.name;
      assert.equal(c.readinessProbe.httpGet?.path, "/readyz");
      assert.ok(isHttpPort(c.readinessProbe.httpGet.port));
      assert.equal(c.livenessProbe.httpGet?.path, "/livez");
      assert.ok(isHttpPort(c.livenessProbe.httpGet.port));
      assert.ok(c.startupProbe.httpGet && isHttpPort(c.startupProbe.httpGet.port));
    });

    it("drains streams: preStop sleep without a shell, long termination grace", () => {
      const grace = dp.spec.terminationGracePeriodSeconds;
      const sleep = c.lifecycle?.preStop?.sleep?.seconds;
      assert.ok(sleep > 0, "preStop.sleep");
      assert.equal(c.lifecycle.preStop.exec, undefined, "preStop exec needs a shell/tool in the image");
      const cm = find(objects, "ConfigMap", "sflb-config");
      const drainGrace = durationSeconds(cm?.data?.SFLB_DRAIN_GRACE ?? "0");
      if (kind === "prod") assert.ok(grace >= 600, `terminationGracePeriodSeconds ${grace} >= 600`);
      assert.ok(grace > sleep + drainGrace + 30,
                `grace ${grace}s leaves room after preStop ${sleep}s + drain grace ${drainGrace}s`);
    });

    it("rolls without losing capacity and spreads across nodes", () => {
      assert.equal(dp.obj.spec.strategy?.rollingUpdate?.maxUnavailable, 0, "maxUnavailable 0");
      const tsc = dp.spec.topologySpreadConstraints || [];
      const host = tsc.find((x) => x.topologyKey === "kubernetes.io/hostname");
      assert.ok(host, "spread over kubernetes.io/hostname");
      assert.ok(selects(host.labelSelector, dp.labels), "spread selector matches the dataplane pods");
    });

    it("has a Service :80 -> the HTTP port", () => {
      const svc = find(objects, "Service", "sflb-dataplane");
      assert.ok(svc, "Service sflb-dataplane");
      assert.ok(selects({ matchLabels: svc.spec.selector }, dp.labels), "selector");
      const port = svc.spec.ports.find((p) => p.port === 80);
      assert.ok(port, "port 80");
      assert.ok(c.ports.some((p) => p.containerPort === 3000 &&
                                    (p.name === port.targetPort || p.containerPort === port.targetPort)));
      assert.ok(!svc.spec.ports.some((p) => p.port === 9090 || p.targetPort === "metrics"),
                "metrics stay off the client Service");
    });

    if (kind === "prod") {
      it("prod: >= 3 replicas, CPU autoscaler at 70%, disruption budget", () => {
        assert.ok(dp.obj.spec.replicas >= 3, `replicas ${dp.obj.spec.replicas}`);
        assert.ok(hpa, "HorizontalPodAutoscaler");
        assert.equal(hpa.apiVersion, "autoscaling/v2");
        assert.equal(hpa.spec.scaleTargetRef.kind, "Deployment");
        assert.ok(hpa.spec.minReplicas >= 3 && hpa.spec.minReplicas <= hpa.spec.maxReplicas);
        assert.ok(hpa.spec.minReplicas <= dp.obj.spec.replicas, "HPA floor <= replicas");
        const cpu = hpa.spec.metrics.find((m) => m.type === "Resource" && m.resource.name === "cpu");
        assert.equal(cpu?.resource.target.averageUtilization, 70);
        assert.ok(pdb, "PodDisruptionBudget");
        assert.ok(pdb.spec.minAvailable >= 1 && pdb.spec.minAvailable < hpa.spec.minReplicas,
                  "minAvailable leaves room for one eviction");
      });
    } else {
      it("dev: one replica, no autoscaler, no disruption budget", () => {
        assert.equal(dp.obj.spec.replicas, 1);
        assert.equal(hpa, undefined, "HPA");
        assert.equal(pdb, undefined, "PDB");
      });
    }
  });

  describe(`${label}: objects`, () => {
    it("every object carries app.kubernetes.io/name=sflb (Namespace aside) and one namespace", () => {
      const namespaces = new Set();
      for (const o of objects) {
        if (o.kind === "Namespace") continue;
        assert.equal(o.metadata.labels?.["app.kubernetes.io/name"], "sflb", `${o.kind}/${o.metadata.name}`);
        namespaces.add(o.metadata.namespace);
      }
      assert.equal(namespaces.size, 1, `namespaces: ${[...namespaces]}`);
      const [ns] = namespaces;
      assert.ok(ns, "overlays set a namespace");
      const nsObj = find(objects, "Namespace", ns);
      if (nsObj) {
        assert.equal(nsObj.metadata.labels?.["pod-security.kubernetes.io/enforce"], "restricted");
      }
    });
  });
}

describe("schema: unknown fields (TypeScript excess-property check)", () => {
  it("no rendered object has a field the Kubernetes API does not know", () => {
    const problems = checkUnknownFields(renderedTargets().map((t) => ({ label: t.label, objects: t.objects })));
    assert.deepEqual(problems, []);
  });
});

describe("sources under deploy/k8s", () => {
  const files = [];
  const walk = (d) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (/\.ya?ml$/.test(e.name)) files.push(p);
    }
  };
  walk(k8sDir);
  const rel = (p) => path.relative(k8sDir, p);

  it("no Secret with data outside examples/, and examples/ is never referenced", () => {
    for (const f of files) {
      const docs = parseYamlDocuments(fs.readFileSync(f, "utf8"), f);
      for (const d of docs) {
        if (d.kind === "Secret" && !rel(f).startsWith("examples/")) {
          assert.fail(`${rel(f)}: a Secret outside examples/`);
        }
        if (["Kustomization", "Component"].includes(d.kind)) {
          const refs = [...(d.resources || []), ...(d.components || []),
                        ...(d.patches || []).map((p) => p.path || "")];
          for (const r of refs) assert.ok(!r.includes("examples"), `${rel(f)} references ${r}`);
          assert.equal(d.secretGenerator, undefined, `${rel(f)}: secretGenerator`);
        }
      }
    }
  });

  it("examples/secrets.example.yaml holds only placeholders for the two documented Secrets", () => {
    const f = path.join(k8sDir, "examples", "secrets.example.yaml");
    const docs = parseYamlDocuments(fs.readFileSync(f, "utf8"), f);
    assert.deepEqual(docs.map((d) => d.metadata.name).sort(), [...kExternalSecrets].sort());
    for (const d of docs) {
      assert.equal(d.data, undefined, "stringData placeholders only");
      for (const [k, v] of Object.entries(d.stringData)) assert.match(v, /REPLACE-ME/, `${d.metadata.name}.${k}`);
    }
    const creds = docs.find((d) => d.metadata.name === "sflb-credentials");
    assert.deepEqual(Object.keys(creds.stringData).sort(), ["LB_ADMIN_KEY", "LB_API_KEY"]);
    assert.ok("keys.txt" in docs.find((d) => d.metadata.name === "sflb-keys").stringData);
  });

  it("every YAML file parses", () => {
    for (const f of files) YAML.parseAllDocuments(fs.readFileSync(f, "utf8")).forEach((d) => {
      assert.deepEqual(d.errors, [], rel(f));
    });
  });
});
