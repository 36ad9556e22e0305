// Rendering kustomizations: with a real kustomize (`kubectl kustomize`, or a `kustomize` binary)
// when one is installed, else with renderSubset() below.
//
// renderSubset() implements only the part of kustomize that deploy/k8s uses, and refuses anything
// else with an error naming the field, so it can never silently render something differently:
//   - resources (files and kustomization folders), components (kind: Component)
//   - namespace
//   - labels (pairs, includeSelectors: false, includeTemplates: false)
//   - images (name, newName, newTag, digest)
//   - patches with `path:` to a strategic-merge patch without `target:`, including
//     `$patch: delete` of a whole object. List merge keys: see kMergeKeys.
// Wherever a real kustomize is installed, tests/deploy/renderer.test.mjs renders every target with
// both and requires identical objects, so the subset stays faithful for these manifests.

import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import YAML from "yaml";

// Parses a multi-document YAML string into plain objects, skipping empty documents.
export function parseYamlDocuments(text, where) {
  const docs = YAML.parseAllDocuments(text);
  const out = [];
  for (const doc of docs) {
    if (doc.errors.length > 0) {
      throw new Error(`${where}: ${doc.errors.map((e) => e.message).join("; ")}`);
    }
    const value = doc.toJS();
    if (value !== null && value !== undefined) out.push(value);
  }
  return out;
}

// ---- Real kustomize ----------------------------------------------------------------------------

// The real renderer on this machine, or null: {name, version, render(dir) -> objects}.
// Needs kustomize v4+ (Components, `labels`); kubectl 1.21+ embeds one. Debian 12's
// kubernetes-client (kubectl 1.20, kustomize v2.0.3) is too old and is not used.
export function findRealKustomize() {
  const tryRun = (cmd, args) => {
    try {
      return execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    } catch {
      return null;
    }
  };
  const major = (text) => {
    const m = /v?(\d+)\.(\d+)\.(\d+)/.exec(text || "");
    return m ? Number(m[1]) : 0;
  };
  if (process.env.SFLB_DEPLOY_NO_KUSTOMIZE === "1") return null;  // tests the fallback path
  const kubectl = tryRun("kubectl", ["version", "--client"]);
  if (kubectl) {
    const m = /Kustomize Version:\s*(v[\d.]+)/.exec(kubectl);
    const client = (/Client Version:\s*(\S+)/.exec(kubectl) || [])[1] || "?";
    if (m && major(m[1]) >= 4) {
      return {
        name: `kubectl ${client} (kustomize ${m[1]})`,
        render: (dir) => parseYamlDocuments(
            execFileSync("kubectl", ["kustomize", dir], { encoding: "utf8" }), dir),
      };
    }
  }
  const standalone = tryRun("kustomize", ["version"]);
  if (standalone && major(standalone) >= 4) {
    return {
      name: `kustomize ${standalone.trim()}`,
      render: (dir) => parseYamlDocuments(
          execFileSync("kustomize", ["build", dir], { encoding: "utf8" }), dir),
    };
  }
  return null;
}

// ---- The subset renderer -----------------------------------------------------------------------

const kKustomizationFields = new Set([
  "apiVersion", "kind", "resources", "components", "namespace", "labels", "images", "patches",
]);
const kKustomizationFiles = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

// Strategic-merge list keys for the lists deploy/k8s patches or might patch. A list not named
// here is replaced as a whole by the patch, as kustomize does for lists without a merge key.
const kMergeKeys = {
  containers: "name",
  initContainers: "name",
  env: "name",
  volumes: "name",
  volumeMounts: "mountPath",
  imagePullSecrets: "name",
  topologySpreadConstraints: "topologyKey",
};

// Kinds without a namespace, for the namespace transformer.
const kClusterScoped = new Set([
  "Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
  "CustomResourceDefinition", "PriorityClass", "ValidatingWebhookConfiguration",
  "MutatingWebhookConfiguration", "APIService", "IngressClass", "RuntimeClass", "CSIDriver",
]);

function readKustomization(dir) {
  for (const name of kKustomizationFiles) {
    const file = path.join(dir, name);
    if (fs.existsSync(file)) {
      const docs = parseYamlDocuments(fs.readFileSync(file, "utf8"), file);
      if (docs.length !== 1) throw new Error(`${file}: expected one YAML document`);
      const k = docs[0];
      for (const field of Object.keys(k)) {
        if (!kKustomizationFields.has(field)) {
          throw new Error(`${file}: field '${field}' is not in the subset renderer ` +
                          "(tests/deploy/lib/kustomize.mjs); add it there or install kustomize");
        }
      }
      return { file, k };
    }
  }
  throw new Error(`${dir}: no kustomization.yaml`);
}

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const clone = (v) => JSON.parse(JSON.stringify(v));

function idOf(obj) {
  const group = (obj.apiVersion || "").includes("/") ? obj.apiVersion.split("/")[0] : "";
  return `${group}/${obj.kind}/${obj.metadata?.namespace || ""}/${obj.metadata?.name}`;
}

// Strategic merge of `patch` into `target` (both plain JSON), returning a new value.
export function strategicMerge(target, patch, key = "") {
  if (!isObject(patch)) return clone(patch);
  if (!isObject(target)) target = {};
  for (const k of Object.keys(patch)) {
    if (k.startsWith("$")) {
      throw new Error(`patch directive '${k}' (under '${key}') is not in the subset renderer`);
    }
  }
  const out = clone(target);
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) {
      delete out[k];
    } else if (Array.isArray(v) && kMergeKeys[k] && Array.isArray(out[k])) {
      out[k] = mergeList(out[k], v, kMergeKeys[k], k);
    } else if (isObject(v)) {
      out[k] = strategicMerge(out[k], v, k);
    } else {
      out[k] = clone(v);
    }
  }
  return out;
}

function mergeList(list, patchList, mergeKey, key) {
  const out = clone(list);
  for (const item of patchList) {
    if (!isObject(item) || !(mergeKey in item)) {
      throw new Error(`patch of '${key}': every item needs '${mergeKey}'`);
    }
    const i = out.findIndex((e) => isObject(e) && e[mergeKey] === item[mergeKey]);
    if (i >= 0) out[i] = strategicMerge(out[i], item, key);
    else out.push(clone(item));
  }
  return out;
}

function loadResources(dir, k, file) {
  const objects = [];
  for (const entry of k.resources || []) {
    const p = path.resolve(dir, entry);
    if (fs.statSync(p).isDirectory()) {
      const sub = readKustomization(p);
      if (sub.k.kind === "Component") throw new Error(`${file}: ${entry} is a Component`);
      objects.push(...build(p));
    } else {
      objects.push(...parseYamlDocuments(fs.readFileSync(p, "utf8"), p));
    }
  }
  return objects;
}

// Applies a kustomization's own transformers (patches, namespace, labels, images) to `objects`.
function transform(dir, k, file, objects) {
  let out = objects;
  for (const p of k.patches || []) {
    if (!isObject(p) || Object.keys(p).some((f) => f !== "path")) {
      throw new Error(`${file}: only 'patches: - path: FILE' is in the subset renderer`);
    }
    const patchFile = path.resolve(dir, p.path);
    for (const patch of parseYamlDocuments(fs.readFileSync(patchFile, "utf8"), patchFile)) {
      const { $patch: directive, ...body } = patch;
      if (directive !== undefined && directive !== "delete") {
        throw new Error(`${patchFile}: '$patch: ${directive}' is not in the subset renderer`);
      }
      const matches = out.filter((o) => o.kind === body.kind && o.apiVersion === body.apiVersion &&
          o.metadata?.name === body.metadata?.name &&
          (!body.metadata?.namespace || o.metadata?.namespace === body.metadata.namespace));
      if (matches.length !== 1) {
        throw new Error(`${patchFile}: patch matches ${matches.length} objects ` +
                        `(${body.kind}/${body.metadata?.name})`);
      }
      out = directive === "delete"
          ? out.filter((o) => o !== matches[0])
          : out.map((o) => (o === matches[0] ? strategicMerge(o, body) : o));
    }
  }
  if (k.namespace) {
    out = out.map((o) => {
      if (o.kind === "Namespace") {
        if (o.metadata.name !== k.namespace) {
          throw new Error(`${file}: Namespace ${o.metadata.name} differs from namespace: ` +
                          `${k.namespace} (renaming is not in the subset renderer)`);
        }
        return o;
      }
      if (kClusterScoped.has(o.kind)) return o;
      return { ...o, metadata: { ...o.metadata, namespace: k.namespace } };
    });
  }
  for (const l of k.labels || []) {
    const extra = Object.keys(l).filter((f) => !["pairs", "includeSelectors", "includeTemplates"].includes(f));
    if (extra.length > 0 || l.includeSelectors || l.includeTemplates) {
      throw new Error(`${file}: labels: only 'pairs' with includeSelectors/includeTemplates false ` +
                      "are in the subset renderer");
    }
    out = out.map((o) => ({
      ...o, metadata: { ...o.metadata, labels: { ...(o.metadata.labels || {}), ...l.pairs } },
    }));
  }
  for (const img of k.images || []) {
    const extra = Object.keys(img).filter((f) => !["name", "newName", "newTag", "digest"].includes(f));
    if (extra.length > 0) throw new Error(`${file}: images: ${extra.join(", ")} not in the subset`);
    out = out.map((o) => retagImages(o, img));
  }
  return out;
}

// The name part of an image reference ("reg:5000/a/b:tag@sha256:..." -> "reg:5000/a/b").
function imageName(ref) {
  const noDigest = ref.split("@")[0];
  const slash = noDigest.lastIndexOf("/");
  const colon = noDigest.lastIndexOf(":");
  return colon > slash ? noDigest.slice(0, colon) : noDigest;
}

function retagImages(obj, img) {
  const o = clone(obj);
  const podSpecs = [o.spec?.template?.spec, o.spec?.jobTemplate?.spec?.template?.spec, o.spec]
      .filter((s) => isObject(s) && (Array.isArray(s.containers) || Array.isArray(s.initContainers)));
  for (const spec of podSpecs) {
    for (const c of [...(spec.containers || []), ...(spec.initContainers || [])]) {
      if (typeof c.image !== "string" || imageName(c.image) !== img.name) continue;
      const rest = c.image.slice(imageName(c.image).length);
      let tagPart = rest.startsWith(":") ? rest.split("@")[0] : "";
      let digestPart = rest.includes("@") ? `@${rest.split("@")[1]}` : "";
      if (img.newTag !== undefined) { tagPart = `:${img.newTag}`; digestPart = ""; }
      if (img.digest !== undefined) { tagPart = ""; digestPart = `@${img.digest}`; }
      c.image = `${img.newName ?? img.name}${tagPart}${digestPart}`;
    }
  }
  return o;
}

function build(dir) {
  const { file, k } = readKustomization(dir);
  let objects = loadResources(dir, k, file);
  for (const entry of k.components || []) {
    const cdir = path.resolve(dir, entry);
    const c = readKustomization(cdir);
    if (c.k.kind !== "Component") throw new Error(`${file}: ${entry} is not a Component`);
    if (c.k.components) throw new Error(`${c.file}: nested components are not in the subset`);
    objects = transform(cdir, c.k, c.file, [...objects, ...loadResources(cdir, c.k, c.file)]);
  }
  objects = transform(dir, k, file, objects);
  const seen = new Set();
  for (const o of objects) {
    const id = idOf(o);
    if (seen.has(id)) throw new Error(`${file}: ${id} is defined twice`);
    seen.add(id);
  }
  return objects;
}

// Renders the kustomization in `dir` with the subset renderer. Throws on anything outside it.
export function renderSubset(dir) {
  return build(path.resolve(dir));
}

// Renders `dir` with the real kustomize when there is one, else with the subset renderer.
// Returns {objects, renderer}.
export function render(dir, real = findRealKustomize()) {
  if (real) return { objects: real.render(dir), renderer: real.name };
  return { objects: renderSubset(dir), renderer: "subset renderer (tests/deploy/lib/kustomize.mjs)" };
}

export { idOf };
