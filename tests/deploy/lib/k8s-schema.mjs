// Validation of rendered Kubernetes objects against the Kubernetes API schemas, two ways:
//
// validateObject(): the `kubernetes-models` package's validators (ajv code generated from the
//   Kubernetes OpenAPI spec, 1.34 for kubernetes-models 5.1.0; the ServiceMonitor CRD from
//   @kubernetes-models/prometheus-operator). Checks types, required fields, enums and formats.
//   Those validators accept unknown fields (a misspelt `readinesProbe` passes), hence:
//
// checkUnknownFields(): TypeScript's excess-property check. Every object becomes a typed literal
//   (`const o: IDeployment = {...}`) against the same package's interfaces, and `tsc --noEmit`
//   reports any field the API does not have, plus wrong types, as kubeconform --strict would.

import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..");  // tests/deploy

// kubernetes-models module for an apiVersion/kind: {module, type} or null when unknown.
export function modelFor(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  if (group === "monitoring.coreos.com") {
    return {
      module: `@kubernetes-models/prometheus-operator/${group}/${version}/${kind}`,
      type: `I${kind}`,
    };
  }
  const module = group ? `kubernetes-models/${group}/${version}/${kind}` : `kubernetes-models/${version}/${kind}`;
  const file = path.join(root, "node_modules", `${module}.js`);
  if (!fs.existsSync(file)) return null;
  return { module, type: `I${kind}` };
}

// Validates one object; returns a list of messages (empty when valid).
export async function validateObject(obj) {
  const model = modelFor(obj.apiVersion, obj.kind);
  if (!model) return [`no schema for ${obj.apiVersion} ${obj.kind}`];
  const mod = await import(model.module);
  const Model = mod[obj.kind];
  if (typeof Model !== "function") return [`${model.module} has no ${obj.kind}`];
  try {
    new Model(obj).validate();
    return [];
  } catch (e) {
    // ValidationError carries ajv's errors: instancePath + message.
    if (Array.isArray(e.errors)) {
      return e.errors.map((x) => `${x.instancePath || "/"} ${x.message}` +
          (x.params ? ` ${JSON.stringify(x.params)}` : ""));
    }
    return [String(e.message || e)];
  }
}

// Type-checks `targets` ([{label, objects}]) with tsc in one run. Returns a list of messages,
// each naming the target, the object and the TypeScript error (empty when all is well).
export function checkUnknownFields(targets) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "sflb-deploy-tsc-"));
  try {
    fs.symlinkSync(path.join(root, "node_modules"), path.join(dir, "node_modules"), "dir");
    const lines = [];
    const where = [];  // line number (1-based) -> "target: Kind/name"
    const imports = new Map();
    let n = 0;
    const body = [];
    for (const { label, objects } of targets) {
      for (const obj of objects) {
        const model = modelFor(obj.apiVersion, obj.kind);
        if (!model) continue;  // reported by validateObject
        const alias = `T${imports.size}`;
        if (!imports.has(model.module)) imports.set(model.module, { alias, type: model.type });
        const { alias: a } = imports.get(model.module);
        const text = `export const o${n++}: ${a} = ${JSON.stringify(obj, null, 2)};`.split("\n");
        body.push({ text, tag: `${label}: ${obj.kind}/${obj.metadata?.name}` });
      }
    }
    for (const [module, { alias, type }] of imports) {
      lines.push(`import type { ${type} as ${alias} } from "${module}";`);
      where.push("imports");
    }
    for (const { text, tag } of body) {
      for (const t of text) { lines.push(t); where.push(tag); }
    }
    fs.writeFileSync(path.join(dir, "objects.ts"), `${lines.join("\n")}\n`);
    fs.writeFileSync(path.join(dir, "tsconfig.json"), JSON.stringify({
      compilerOptions: {
        strict: true, noEmit: true, module: "nodenext", moduleResolution: "nodenext",
        target: "es2022", skipLibCheck: true, types: [],
      },
      files: ["objects.ts"],
    }));
    const tsc = path.join(root, "node_modules", "typescript", "bin", "tsc");
    try {
      execFileSync(process.execPath, [tsc, "-p", path.join(dir, "tsconfig.json"), "--pretty", "false"],
                   { encoding: "utf8", cwd: dir, stdio: ["ignore", "pipe", "pipe"] });
      return [];
    } catch (e) {
      const out = `${e.stdout || ""}${e.stderr || ""}`;
      const messages = [];
      for (const line of out.split("\n")) {
        const m = /^objects\.ts\((\d+),(\d+)\): (.*)$/.exec(line);
        if (m) {
          const lineNo = Number(m[1]);
          messages.push(`${where[lineNo - 1] || "?"}: ${m[3]} [near: ${lines[lineNo - 1].trim()}]`);
        } else if (line.trim()) {
          messages.push(line.trim());
        }
      }
      return messages.length > 0 ? messages : [`tsc failed: ${out || e.message}`];
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
