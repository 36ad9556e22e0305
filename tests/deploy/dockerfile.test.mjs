// deploy/Dockerfile and the root .dockerignore, checked statically (no Docker engine here):
// dockerfile-utils' linter (the one behind VS Code's Docker support), then sflb's image policy.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, it } from "node:test";
import { DockerfileParser } from "dockerfile-ast";
import { validate as lintDockerfile } from "dockerfile-utils";
import { isExcluded, parseDockerignore } from "./lib/dockerignore.mjs";
import { deployDir, repoRoot, sourceStringLiterals } from "./lib/repo.mjs";

const dockerfilePath = path.join(deployDir, "Dockerfile");
const text = fs.readFileSync(dockerfilePath, "utf8");
const dockerfile = DockerfileParser.parse(text);
const instructions = dockerfile.getInstructions();
const kBinaries = ["sflb-controlplane", "sflb-dataplane", "sflbctl"];

// Instructions grouped by stage: [{from, instructions}].
const stages = [];
for (const ins of instructions) {
  if (ins.getKeyword() === "FROM") stages.push({ from: ins, instructions: [] });
  else if (stages.length > 0) stages[stages.length - 1].instructions.push(ins);
}
const argsText = (ins) => ins.getArguments().map((a) => a.getValue()).join(" ");
const ofKind = (stage, kw) => stage.instructions.filter((i) => i.getKeyword() === kw);
const jsonForm = (ins) => {
  const strings = ins.getJSONStrings ? ins.getJSONStrings() : [];
  const raw = argsText(ins).trim();
  return raw.startsWith("[") ? strings.map((s) => s.getJSONValue()) : null;
};
const buildStage = stages[0];
const runtime = stages[stages.length - 1];

describe("Dockerfile", () => {
  it("passes dockerfile-utils' linter with no diagnostics", () => {
    const diagnostics = lintDockerfile(text, {});
    assert.deepEqual(diagnostics.map((d) => `line ${d.range.start.line + 1}: ${d.message}`), []);
  });

  it("builds on debian:12 and runs on debian:12-slim", () => {
    assert.ok(stages.length >= 2, "multi-stage");
    const image = (s) => `${s.from.getImageName()}:${s.from.getImageTag()}`;
    assert.equal(image(buildStage), "debian:12");
    assert.equal(image(runtime), "debian:12-slim");
  });

  it("build stage installs packages with deploy/install-deps.sh and builds Release without tests", () => {
    const copies = ofKind(buildStage, "COPY").map(argsText);
    assert.ok(copies.some((c) => c.startsWith("deploy/install-deps.sh ")), "COPY deploy/install-deps.sh");
    const runs = ofKind(buildStage, "RUN").map(argsText).join("\n");
    assert.match(runs, /bash \S*install-deps\.sh/);
    assert.match(runs, /-DSFLB_BUILD_TESTS=OFF/);
    assert.match(runs, /-DCMAKE_BUILD_TYPE=Release/);
    for (const b of kBinaries) assert.ok(runs.includes(b), `builds ${b}`);
    assert.ok(fs.existsSync(path.join(deployDir, "install-deps.sh")), "deploy/install-deps.sh exists");
  });

  it("the CMake targets it builds exist", () => {
    const cmake = ["controlplane", "dataplane", "ctl"]
        .map((d) => fs.readFileSync(path.join(repoRoot, d, "CMakeLists.txt"), "utf8")).join("\n");
    for (const b of kBinaries) assert.match(cmake, new RegExp(`add_executable\\(${b}\\b`), b);
  });

  it("runtime stage: no toolchain, the three binaries in /usr/local/bin, CA certificates", () => {
    const runs = ofKind(runtime, "RUN").map(argsText).join("\n");
    assert.doesNotMatch(runs, /install-deps\.sh|-dev\b|\bg\+\+|\bcmake\b|\bninja-build\b/);
    assert.match(runs, /ca-certificates/);
    const copies = ofKind(runtime, "COPY");
    assert.ok(copies.some((c) => c.getFlags().some((f) => f.getName() === "from" && f.getValue() === "build") &&
                                  argsText(c).includes("/usr/local/bin")), "COPY --from=build ... /usr/local/bin");
    const buildRuns = ofKind(buildStage, "RUN").map(argsText).join("\n");
    for (const b of kBinaries) {
      assert.ok(buildRuns.includes(`/${b}`) && buildRuns.includes("/out/usr/local/bin"), `${b} staged`);
      assert.ok(runs.includes(b), `runtime smoke test runs ${b}`);
    }
  });

  it("runs as uid 10001, exposes 3000 50051 9090 9091, exec-form entrypoint (no shell)", () => {
    const users = ofKind(runtime, "USER");
    assert.equal(users.length > 0 ? argsText(users[users.length - 1]) : "", "10001:10001");
    const exposed = ofKind(runtime, "EXPOSE").flatMap((e) => argsText(e).split(/\s+/)).map((p) => p.replace(/\/tcp$/, ""));
    assert.deepEqual([...exposed].sort(), ["3000", "50051", "9090", "9091"].sort());
    const entry = ofKind(runtime, "ENTRYPOINT");
    assert.equal(entry.length, 1);
    assert.deepEqual(jsonForm(entry[0]), ["/usr/local/bin/sflb-dataplane"], "exec-form ENTRYPOINT");
    for (const c of ofKind(runtime, "CMD")) assert.ok(jsonForm(c) !== null, "exec-form CMD");
    for (const h of ofKind(runtime, "HEALTHCHECK")) {
      assert.doesNotMatch(argsText(h), /curl|wget|CMD-SHELL|\bsh\b/, "HEALTHCHECK needs no shell or curl");
    }
    assert.match(ofKind(runtime, "RUN").map(argsText).join("\n"),
                 /install -d -o 10001 -g 10001 (?:\S+ )*\/var\/lib\/sflb\b/, "/var/lib/sflb owned by 10001");
  });

  it("no ADD, no secrets baked in (ENV/ARG), the ENV paths match the image's folders", () => {
    assert.deepEqual(instructions.filter((i) => i.getKeyword() === "ADD").map(argsText), []);
    const env = {};
    for (const i of instructions.filter((x) => ["ENV", "ARG"].includes(x.getKeyword()))) {
      for (const p of (i.getProperties ? i.getProperties() : [])) {
        const name = p.getName();
        assert.doesNotMatch(name, /(^|_)(KEY|TOKEN|SECRET|PASSWORD)(_|$)/, `${i.getKeyword()} ${name}`);
        env[name] = p.getValue();
      }
    }
    assert.equal(env.SFLB_KEYS_FILE, "/etc/sflb/keys.txt");
    assert.match(env.SFLB_STATE_FILE || "", /^\/var\/lib\/sflb\//);
    assert.match(env.SFLB_AUDIT_LOG || "", /^\/var\/lib\/sflb\//);
  });
});

describe(".dockerignore (build context of deploy/Dockerfile)", () => {
  const file = path.join(repoRoot, ".dockerignore");
  const patterns = parseDockerignore(fs.existsSync(file) ? fs.readFileSync(file, "utf8") : "");

  it("exists at the repository root and starts by excluding everything (an allowlist)", () => {
    assert.ok(fs.existsSync(file), ".dockerignore at the context root");
    assert.equal(patterns[0]?.text, "*");
    assert.equal(patterns[0]?.negate, false);
  });

  it("keeps secrets, credentials, build folders, .git and tests out", () => {
    for (const f of ["keys.txt", ".sflb-local/credentials", ".git/HEAD", "build/CMakeCache.txt",
                     "build-bench/x", "deploy/secrets/lb_api_key", "deploy/keys/keys.txt", "deploy/.env",
                     "tests/CMakeLists.txt", "common/keys.txt", "dataplane/.sflb-local/x"]) {
      assert.ok(isExcluded(patterns, f), `${f} must not be in the build context`);
    }
  });

  it("sends everything the Release build needs", () => {
    const cmake = fs.readFileSync(path.join(repoRoot, "CMakeLists.txt"), "utf8");
    const dirs = [...cmake.matchAll(/add_subdirectory\(\s*([^\s)]+)/g)].map((m) => m[1])
        .filter((d) => d !== "tests");
    assert.ok(dirs.length >= 5, `add_subdirectory: ${dirs}`);
    let files;
    try {
      files = execFileSync("git", ["ls-files", "--cached", "--others", "--exclude-standard"],
                           { cwd: repoRoot, encoding: "utf8" }).split("\n").filter(Boolean);
    } catch {
      files = [];
    }
    const needed = ["CMakeLists.txt", "deploy/install-deps.sh"];
    for (const d of dirs) {
      const inDir = files.filter((f) => f.startsWith(`${d}/`));
      needed.push(...(inDir.length > 0 ? inDir : [`${d}/CMakeLists.txt`]));
    }
    for (const c of ofKind(buildStage, "COPY").concat(ofKind(runtime, "COPY"))) {
      if (c.getFlags().some((f) => f.getName() === "from")) continue;
      const args = c.getArguments().map((a) => a.getValue());
      for (const src of args.slice(0, -1)) if (src !== ".") needed.push(src);
    }
    const missing = needed.filter((f) => isExcluded(patterns, f));
    assert.deepEqual(missing, [], "files the build needs are excluded from the context");
  });

  it("the context alone configures: cmake -DSFLB_BUILD_TESTS=OFF finds every source file", (t) => {
    let cmakeVersion;
    try {
      cmakeVersion = execFileSync("cmake", ["--version"], { encoding: "utf8" }).split("\n")[0];
    } catch {
      t.skip("no cmake here");
      return;
    }
    const files = execFileSync("git", ["ls-files", "--cached", "--others", "--exclude-standard"],
                               { cwd: repoRoot, encoding: "utf8" }).split("\n").filter(Boolean);
    const ctx = fs.mkdtempSync(path.join(os.tmpdir(), "sflb-docker-context-"));
    try {
      let n = 0;
      for (const f of files) {
        if (isExcluded(patterns, f) || !fs.existsSync(path.join(repoRoot, f))) continue;
        fs.mkdirSync(path.dirname(path.join(ctx, f)), { recursive: true });
        fs.copyFileSync(path.join(repoRoot, f), path.join(ctx, f));
        n++;
      }
      t.diagnostic(`${n} files in the context; ${cmakeVersion}`);
      try {
        execFileSync("cmake", ["-S", ctx, "-B", path.join(ctx, "_build"), "-DCMAKE_BUILD_TYPE=Release",
                               "-DSFLB_BUILD_TESTS=OFF"], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
      } catch (e) {
        assert.fail(`cmake configure of the Docker build context failed:\n${e.stdout}\n${e.stderr}`);
      }
    } finally {
      fs.rmSync(ctx, { recursive: true, force: true });
    }
  });
});

describe("image usage documented in the Dockerfile", () => {
  it("documents --entrypoint for the controlplane and sflbctl", () => {
    assert.match(text, /--entrypoint \/usr\/local\/bin\/sflb-controlplane/);
    assert.match(text, /--entrypoint \/usr\/local\/bin\/sflbctl/);
  });
  it("mentions only settings and flags the binaries know", () => {
    const known = sourceStringLiterals();
    for (const m of text.matchAll(/(?<!-D)\b(SFLB_[A-Z_]+|LB_[A-Z_]+)\b/g)) {
      assert.ok(known.has(m[1]), `${m[1]} is not a setting of the binaries`);
    }
  });
});
